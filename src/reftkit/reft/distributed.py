"""Training on several processes with torch.distributed: joining the process group, rank helpers, the split of a
global batch across ranks, small collectives that carry JSON and bytes (never pickle), and the launcher checks.

Decisions:
- The process group is joined when a launcher says there are several processes (`WORLD_SIZE` > 1, as `torchrun`
  and `accelerate launch` set it). The backend follows the device: NCCL for CUDA, gloo otherwise. The timeout is
  `REFTKIT_DIST_TIMEOUT` seconds (default 1800), so a collective that a dead or stuck rank never joins fails
  instead of hanging for torch's default of 30 minutes where the caller asks for less.
- Every rank holds the whole (tiny) training set and builds the same global batches; rank r takes the r-th of
  `world` contiguous chunks of each one (`split`), so the rows a step sees do not depend on the world size.
- Collectives on CPU tensors with gloo; on CUDA tensors of the current device with NCCL (`comm_device`).
- What only rank 0 does (reading and writing the run folder) goes through `on_main`: the other ranks wait for its
  result and raise the same typed error when it failed, so a failure on rank 0 never leaves them in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from datetime import timedelta

import torch

from .. import errors
from ..errors import ConfigError, ReftkitError

log = logging.getLogger(__name__)
TIMEOUT_ENV = "REFTKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


def _dist():
    import torch.distributed as dist

    return dist


def launched_world_size() -> int:
    """The number of processes the launcher started (`WORLD_SIZE`; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive, got {text!r}")
    return timedelta(seconds=seconds)


def local_device(device: "str | torch.device") -> torch.device:
    """The device of this rank: `cuda` means `cuda:LOCAL_RANK` under a launcher (one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: "str | torch.device" = "cpu") -> bool:
    """Join the process group when launched as several processes; True when this run is distributed.
    Idempotent: a group the caller initialised is used as it is."""
    dist = _dist()
    if is_initialized():
        return dist.get_world_size() > 1
    if launched_world_size() <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    device = local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout())
    if dist.get_rank() == 0:
        log.info("%d processes joined the %s process group", dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def setup(device: "str | None") -> str | None:
    """For a command that loads its own model: under a launcher, join the process group and return this rank's
    device (`cuda` becomes `cuda:LOCAL_RANK`); without one, None (nothing changes)."""
    if launched_world_size() <= 1 and not is_initialized():
        return None
    from ..devices import resolve_device

    resolved = local_device(resolve_device(device))
    init(resolved)
    return str(resolved)


def close() -> None:
    """Leave the process group this module (or the caller) initialised."""
    if is_initialized():
        _dist().destroy_process_group()


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def comm_device() -> torch.device:
    if is_initialized() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def split(rows: list, rank_: int, world: int) -> list:
    """Rank `rank_`'s share of a global batch: the `rank_`-th of `world` contiguous chunks whose sizes differ by
    at most one (the first chunks are the larger). A chunk may be empty when the batch has fewer rows than ranks."""
    base, extra = divmod(len(rows), world)
    start = rank_ * base + min(rank_, extra)
    return rows[start: start + base + (1 if rank_ < extra else 0)]


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ConfigError(f"train.batch_size {batch_size} is not a multiple of the {world} processes: the global "
                          f"batch is split evenly across them; set batch_size to a multiple of {world} (e.g. "
                          f"{batch_size + world - batch_size % world}) or start {_divisors(batch_size)} processes")


def _divisors(n: int) -> str:
    ds = [d for d in range(2, n + 1) if n % d == 0]
    return "1" if not ds else " or ".join(str(d) for d in [1, *ds][:4])


# ---- collectives ------------------------------------------------------------------------------------------

def all_sum(values) -> torch.Tensor:
    """The element-wise sum over ranks of a float64 vector (a number or a list of numbers)."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).to(comm_device())
    if world_size() > 1:
        _dist().all_reduce(t)
    return t.cpu()


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order."""
    world = world_size()
    if world == 1:
        return [data]
    dist, dev = _dist(), comm_device()
    size = torch.tensor([len(data)], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [bytes(b[: int(s.item())].cpu().tolist()) for b, s in zip(bufs, sizes)]


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (other ranks pass None)."""
    if world_size() == 1:
        return data or b""
    dist, dev = _dist(), comm_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=dev)
    dist.broadcast(size, 0)
    buf = torch.zeros(max(int(size.item()), 1), dtype=torch.uint8, device=dev)
    if is_main() and data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    dist.broadcast(buf, 0)
    return bytes(buf[: int(size.item())].cpu().tolist())


def broadcast_json(value=None):
    """Rank 0's JSON-serialisable `value` on every rank."""
    text = json.dumps(value).encode() if is_main() else None
    return json.loads(broadcast_bytes(text).decode())


def on_main(fn):
    """Run `fn()` on rank 0 only and return its (JSON-serialisable) result on every rank. A `ReftkitError` raised
    there is raised on every rank, with the same type and message; other exceptions on rank 0 propagate there and
    end the other ranks with a `ReftkitError` saying so."""
    if world_size() == 1:
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = {"ok": fn()}
        except ReftkitError as e:
            outcome = {"error": type(e).__name__, "message": str(e)}
            broadcast_json(outcome)
            raise
        except BaseException as e:
            broadcast_json({"error": "ReftkitError", "message": f"rank 0 failed: {type(e).__name__}: {e}"})
            raise
    outcome = broadcast_json(outcome)
    if "error" in outcome:  # only the other ranks get here: rank 0 raised above
        kind = getattr(errors, outcome["error"], ReftkitError)
        kind = kind if isinstance(kind, type) and issubclass(kind, ReftkitError) else ReftkitError
        raise kind(outcome["message"])
    return outcome["ok"]


def check_same(summary: dict, what: str = "training run") -> None:
    """Every rank describes its run with the same JSON `summary`, else a `ConfigError` on every rank names the keys
    that differ and the ranks that differ from rank 0."""
    if world_size() == 1:
        return
    flat = {}
    for key, value in summary.items():  # one level down, so a difference names e.g. train.lr
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) and value else {key: value})
    mine = json.dumps(flat, sort_keys=True, default=str)
    everyone = [json.loads(b.decode()) for b in all_gather_bytes(mine.encode())]
    first = everyone[0]
    diffs = []
    for r, other in enumerate(everyone[1:], 1):
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if keys:
            diffs.append(f"rank {r} differs from rank 0 in {', '.join(keys)} "
                         f"(rank 0: {_short({k: first.get(k) for k in keys})}, rank {r}: "
                         f"{_short({k: other.get(k) for k in keys})})")
    if diffs:
        raise ConfigError(f"the {len(everyone)} processes were given different {what}s: {'; '.join(diffs)}; start "
                          "every process with the same recipe, data and options")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: `cpu`, and `cuda.N` for each visible GPU."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def restore_rng(rng: dict, saved_world: int, draws: bool, where) -> None:
    """Restore this rank's RNG state from a checkpoint's (`gather_tensors` of `rng_state`). A checkpoint of another
    world size continues exactly only when training draws no random numbers (`draws` False: no dropout)."""
    world = world_size()
    if saved_world != world:
        if draws:
            raise ConfigError(
                f"checkpoint {where} was written by a run of {saved_world} process(es) and this run has {world}; "
                f"with dropout each process draws its own random numbers, so only {saved_world} process(es) "
                f"continue it exactly: resume with `torchrun --nproc_per_node {saved_world}`"
                + (" (or without torchrun)" if saved_world == 1 else "") + ", or train without dropout")
        log.info("resuming a checkpoint of %d process(es) on %d: without dropout the random state is unused",
                 saved_world, world)
    prefix = "" if saved_world == 1 else f"rank{rank() if saved_world == world else 0}."
    mine = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
    torch.set_rng_state(mine["cpu"])
    cuda = [mine[k] for k in sorted(mine) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def gather_tensors(mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's CPU tensors: `mine` itself in one process, else `rankR.KEY` for each rank R and key."""
    from safetensors.torch import load, save

    if world_size() == 1:
        return mine
    out = {}
    for r, blob in enumerate(all_gather_bytes(save(mine))):
        out.update({f"rank{r}.{k}": v for k, v in load(blob).items()})
    return out


def fingerprint(examples) -> str:
    """A short hash of a list of dataclass examples (to compare the data ranks were given)."""
    import hashlib
    from dataclasses import asdict

    text = json.dumps([asdict(e) for e in examples or []], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- DDP --------------------------------------------------------------------------------------------------

def _sum_gradients(state, bucket):
    """DDP comm hook: the sum of the ranks' gradients (each loss is already divided by the global item count)."""
    return _dist().all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def ddp(reft):
    """DDP over the trainable tensors of a `ReftModel` only: the frozen base is neither broadcast nor reduced, and
    gradients are summed (not averaged) across ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in reft.named_parameters() if not p.requires_grad]
    ignore += [f"model.{n}" for n, _ in reft.model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(reft, ignore)
    device = next(p for p in reft.parameters() if p.requires_grad).device
    with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers but says to keep it for no init sync
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model = DDP(reft, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    model.register_comm_hook(None, _sum_gradients)
    return model


def sum_gradients(params: list) -> None:
    """Sum the gradients of `params` over ranks in one collective (a missing gradient counts as zeros). Used for
    the interventions when the decoder layers are FSDP-sharded, where the interventions stay whole on every rank."""
    if world_size() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = flat.to(comm_device())
    _dist().all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.device).clone()
        offset += n


def shard_layers(reft) -> None:
    """FSDP2 `fully_shard` on each decoder layer of the (frozen) base model, over a mesh of every rank on the
    model's device type (a CPU mesh for gloo, so nothing is moved to CUDA). The interventions and the modules
    outside the layers stay whole; the engine's hooks run on the sharded layers, whose weights FSDP gathers for
    each forward and backward. The layers stay sharded after training."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..sites import find_blocks

    device = next(reft.model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    _, blocks = find_blocks(reft.model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    log.info("FSDP2: %d decoder layers sharded over %d ranks", len(blocks), world_size())


# ---- launcher checks --------------------------------------------------------------------------------------

def check_launcher(seen_world_size: int, what: str = "this run") -> None:
    """Refuse the launcher trap: a launcher started several processes (`WORLD_SIZE` > 1) but each one runs alone
    (world size 1, or no process group), which would train the same adapter several times without synchronising
    them. `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs does this unless the run
    asks for CPU (`TrainingArguments(use_cpu=True)` / `Accelerator(cpu=True)`)."""
    launched = launched_world_size()
    if launched > 1 and seen_world_size <= 1:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}), but {what} sees a world of size "
            f"{seen_world_size}: each process would train alone, unsynchronised. On a machine without GPUs pass "
            "TrainingArguments(use_cpu=True) (or Accelerator(cpu=True)) so the processes join one gloo group, or "
            "launch with `torchrun --nproc_per_node N`; to train in one process, start one")
