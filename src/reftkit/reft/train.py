"""Training ReFT adapters: a plain PyTorch loop with atomic, resumable checkpoints.

- Tasks: `sft` (loss on completion tokens only), `classification` (the model's own head and loss; list the head
  in `modules_to_save` to train it) and `dpo` (the reference model is the same model with adapters disabled,
  so no second copy is held in memory).
- Gradient accumulation, periodic evaluation, bf16 autocast where the device computes bf16 natively (`bf16='auto'`,
  the default; see `reftkit.precision`).
- Checkpoints hold the trainable tensors as the optimizer sees them (raw parametrization parameters, not the
  computed matrices of the adapter format), the optimizer and scheduler state, the RNG state and the loop state,
  all as safetensors + JSON. They are written atomically every `save_every` steps, so a kill loses at most that
  interval, and `resume=True` continues from the last one with the same data order: the resumed run ends with
  the weights and the loss history an uninterrupted run would have. A kill in the middle of a checkpoint write is
  recovered from (`atomic.recover_folder`) when the run resumes.
- Nothing is lost: a run that writes checkpoints refuses a non-empty `output_dir` unless it resumes
  (`resume=True`) or replaces (`overwrite=True`: the old checkpoint stays until the first new one replaces it;
  `train` writes only `output_dir/checkpoint`, other files there are left alone). Whether `output_dir` can be
  written is probed before the first step, so a read-only folder or a full disk fails before any training; a
  checkpoint write that fails keeps the previous checkpoint and raises `OutputError` naming the folder.
- Several processes (`torchrun --nproc_per_node N`, see `reftkit.reft.distributed` and docs/scaling.md): every
  rank builds the same global batches and takes its contiguous share of each; the trainable tensors are wrapped
  in DDP (the frozen base is not: it is neither broadcast nor reduced) with a comm hook that sums gradients, and
  each loss is divided by the item count of the whole global window, so N processes with global batch G compute
  the step of one process with batch G. Clipping, the step and the scheduler then run identically on every rank.
  Rank 0 alone shows progress, logs, evaluates the gathered sums and writes checkpoints (with every rank's RNG
  state); a resume reads them on rank 0 and broadcasts them, so no other rank needs the run folder.
  `fsdp=True` shards the base's decoder layers with FSDP2 instead (`distributed.shard_layers`); the interventions
  stay whole and their gradients are summed in one collective per step.
- Many adapters in one pass (`streams`, used by `reftkit.reft.concepts`): each adapter has its own data, batches,
  epochs, step count and learning-rate schedule, and its rows are routed to it; the loss of each adapter is
  normalised by its own items and gradients are clipped per adapter, so every adapter follows the trajectory it
  would follow trained alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from ..atomic import check_writable, recover_folder
from ..errors import ConfigError, DataError, OutputError
from ..precision import check_bf16_setting, resolve_bf16
from . import distributed as dist
from .checkpoint import _load_checkpoint, _save_checkpoint, unwrap
from .data import TASK_FIELDS, Collator, Example
from .model import ReftModel

log = logging.getLogger(__name__)
TASKS = tuple(TASK_FIELDS)


@dataclass
class TrainArgs:
    epochs: float = 3
    batch_size: int = 8
    lr: float = 4e-3
    weight_decay: float = 0.0
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    max_grad_norm: float | None = None  # clip the global gradient norm before each step (None: no clipping)
    eval_every: int = 0
    save_every: int = 0
    output_dir: str | None = None
    seed: int = 0
    bf16: bool | str = "auto"  # bf16 autocast: "auto" (where native, see reftkit.precision), True or False
    dpo_beta: float = 0.1
    padding_side: str = "right"
    progress: bool = True
    fsdp: bool = False  # under several processes: shard the base's decoder layers with FSDP2 (see distributed)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"train option {name} must be an integer, got {value!r}")
        for name in ("epochs", "lr", "weight_decay", "warmup_ratio", "dpo_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"train option {name} must be a number, got {value!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"batch_size and grad_accum must be >= 1, got {self.batch_size} and {self.grad_accum}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ConfigError(f"max_steps must be a positive integer or null, got {self.max_steps!r}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0 or self.weight_decay < 0:
            raise ConfigError(f"warmup_ratio must be in [0, 1) and weight_decay >= 0, got {self.warmup_ratio} "
                              f"and {self.weight_decay}")
        if min(self.eval_every, self.save_every) < 0:
            raise ConfigError("eval_every and save_every must be >= 0 (0 = never)")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        check_bf16_setting(self.bf16, "train option bf16")
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"train option fsdp must be true or false, got {self.fsdp!r}")
        g = self.max_grad_norm
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
            raise ConfigError(f"max_grad_norm must be a positive number or null, got {g!r}")


def sequence_logprobs(reft: ReftModel, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens, per example."""
    labels = batch["labels"]
    out = reft(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    logits = out.logits.float()
    if logits.dim() == 3:  # the model did not take a logits mask
        logits = logits[keep]
    target = labels[:, 1:][keep[:, :-1]]
    lp = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], device=lp.device, dtype=lp.dtype).index_add(0, rows, lp)


def batch_items(batch: dict, task: str) -> int:
    """What a batch's loss averages over: label tokens (sft), labelled examples (classification), pairs (dpo)."""
    labels = batch["labels"]
    if task == "dpo":
        return labels.shape[0] // 2
    counted = labels[:, 1:] if task == "sft" else labels
    return int((counted != -100).sum()) if not counted.is_floating_point() else counted.shape[0]


def task_loss(reft: ReftModel, batch: dict, task: str, beta: float = 0.1, num_items: int | None = None):
    """The loss of one batch: the mean over its items, or (with `num_items`, the items of a whole accumulation
    window) their sum divided by `num_items`, so a window's micro-batches add up to one large batch's loss.
    DPO's reference is the same model with its adapters disabled: no second copy of the model exists."""
    if task != "dpo":
        return reft(**batch, num_items_in_batch=num_items).loss
    losses = dpo_losses(reft, batch, beta)
    return losses.mean() if num_items is None else losses.sum() / num_items


def dpo_losses(reft, batch: dict, beta: float) -> torch.Tensor:
    """DPO's loss per pair (chosen rows first, then rejected). The reference forward runs without gradients on
    the unwrapped model (outside DDP)."""
    B = batch["input_ids"].shape[0] // 2
    policy = sequence_logprobs(reft, batch)
    inner = unwrap(reft)
    with torch.no_grad(), inner.disable_adapter():
        ref = sequence_logprobs(inner, batch)
    margin = (policy[:B] - ref[:B]) - (policy[B:] - ref[B:])
    return -F.logsigmoid(beta * margin)


def row_losses(reft, batch: dict, task: str, beta: float = 0.1) -> torch.Tensor:
    """The summed loss of each example (sft: over its label tokens; dpo: of its pair), for routed batches whose
    examples are normalised by different item counts."""
    if task == "dpo":
        return dpo_losses(reft, batch, beta)
    if task == "sft":
        return -sequence_logprobs(reft, batch)
    raise ConfigError(f"training several adapters in one pass supports the tasks sft and dpo, not {task!r}")


def row_items(batch: dict, task: str) -> torch.Tensor:
    """The items each example contributes to `batch_items` (label tokens, 1 per classification example or pair)."""
    labels = batch["labels"]
    if task == "dpo":
        return torch.ones(labels.shape[0] // 2, dtype=torch.long)
    if task == "sft":
        return (labels[:, 1:] != -100).sum(1).cpu()
    return (labels != -100).long().reshape(labels.shape[0], -1).sum(1).cpu()


def _batches(data: list[Example], args: TrainArgs, epoch: int) -> list[list[Example]]:
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(data), generator=g).tolist()
    return [[data[i] for i in order[s: s + args.batch_size]] for s in range(0, len(order), args.batch_size)]


def param_groups(reft: ReftModel, weight_decay: float, adapter: str | None = None) -> list[dict]:
    """Trainable parameters in two groups: rotations (whose raw parameter must never decay: the Householder
    map reads its diagonal as signs) and the rest. With `adapter`, only that adapter's parameters."""
    no_decay = set()
    for prefix, mod in reft.named_modules():
        if hasattr(mod, "no_weight_decay"):
            no_decay |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    decay, keep = [], []
    for name, p in reft.named_parameters():
        if p.requires_grad and (adapter is None or name.startswith(f"adapters.{adapter}.")):
            (keep if name in no_decay else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0})
            if g["params"]]


def _autocast(reft: ReftModel, bf16: "bool | str"):
    device = next(reft.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_bf16(bf16, device, warn=False))


@contextlib.contextmanager
def bf16_training_attention(reft: ReftModel, args):
    """bf16 autocast on a CPU trains with eager attention: torch's CPU flash-attention backward in bf16 costs about
    ten times its forward, while the eager softmax(QKᵀ)V is ordinary bf16 matmuls. The model's own setting is
    restored afterwards; fp32, GPUs and models that cannot switch are left as they are. `args` is anything with a
    `bf16` flag (`TrainArgs` or transformers' `TrainingArguments`)."""
    model = reft.model
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    device = next(reft.parameters()).device.type
    switchable = current == "sdpa" and hasattr(model, "set_attn_implementation")
    bf16 = getattr(args, "bf16", False)
    if not (device == "cpu" and switchable and resolve_bf16(bf16, device, warn=False)):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError) as e:  # a model without an eager path keeps its own
        log.info("keeping %s attention for bf16 training: %s", current, e)
        yield
        return
    log.info("bf16 training on CPU: eager attention for the run (was %s)", current)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def evaluate(reft: ReftModel, data: list[Example], collator: Collator, args: TrainArgs, task: str) -> float:
    """The loss over `data`, averaged over its items (label tokens, examples or pairs) as in training. Under
    several processes each rank evaluates every world-th batch and the sums are gathered: every rank returns the
    loss over the whole of `data`."""
    reft = unwrap(reft)
    was_training = reft.training
    reft.eval()
    total, n = 0.0, 0
    rank, world = dist.rank(), dist.world_size()
    starts = list(range(0, len(data), args.batch_size))
    with torch.no_grad(), _autocast(reft, args.bf16):
        for i in range(rank, math.ceil(len(starts) / world) * world, world):  # the same count on every rank
            s = starts[i] if i < len(starts) else 0  # a rank past the end repeats batch 0 and ignores it (FSDP)
            batch = collator(data[s: s + args.batch_size])
            loss = float(task_loss(reft, batch, task, args.dpo_beta, num_items=1))
            if i < len(starts):
                total += loss
                n += batch_items(batch, task)
    total, n = dist.all_sum([total, n]).tolist()
    reft.train(was_training)
    return total / max(n, 1)


@dataclass
class Stream:
    """The data of one adapter (`name`; None for the active adapter) and the optimizer groups it owns."""
    name: str | None
    data: list[Example]
    groups: list[int] = field(default_factory=list)
    total_steps: int = 0


def _schedule(total: int, warm: int):
    return lambda s: (s + 1) / max(warm, 1) if s < warm else max(0.0, (total - s) / max(total - warm, 1))


RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout from seed + r * stride (rank 0: the one-process stream)


def train(reft: ReftModel, data: list[Example], args: TrainArgs, *, task: str = "sft", pad_token_id: int = 0,
          eval_data: list[Example] | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the trainable adapters (and `modules_to_save`). Returns metrics: the loss of every optimizer step,
    eval losses, time, examples/s. Each step accumulates `grad_accum` batches, normalised over the items of all
    of them, so it equals one step on a batch `grad_accum` times larger. With `args.output_dir` and
    `args.save_every`, checkpoints go to `output_dir/checkpoint`; `resume=True` continues from there and
    `overwrite=True` lets a new run replace what an earlier one left in `output_dir`. Under a launcher
    (`torchrun --nproc_per_node N`) the processes share each global batch of `batch_size` (see the module
    docstring)."""
    if not data:
        raise DataError("the training set is empty")
    return train_streams(reft, [Stream(None, data)], args, task=task, pad_token_id=pad_token_id,
                         eval_data=eval_data, resume=resume, overwrite=overwrite)


def train_streams(reft: ReftModel, streams: list[Stream], args: TrainArgs, *, task: str = "sft",
                  pad_token_id: int = 0, eval_data: list[Example] | None = None, resume: bool = False,
                  overwrite: bool = False) -> dict:
    """`train` over one stream (the active adapter) or several (one adapter each, rows routed by name: see the
    module docstring). The metrics of several streams add `adapter_losses` (name -> loss of each of its steps)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    routed = len(streams) > 1 or streams[0].name is not None
    groups, lambdas = [], []
    for s in streams:
        if not s.data:
            raise DataError(f"the training set of adapter {s.name!r} is empty")
        g = param_groups(reft, args.weight_decay, s.name)
        if not g:
            raise ConfigError("nothing to train: the adapter has no trainable parameters (load it with is_trainable=True)"
                              if s.name is None else f"adapter {s.name!r} has no trainable parameters")
        steps_per_epoch = math.ceil(math.ceil(len(s.data) / args.batch_size) / args.grad_accum)
        s.total_steps = args.max_steps or max(1, int(math.ceil(steps_per_epoch * args.epochs)))
        s.groups = list(range(len(groups), len(groups) + len(g)))
        groups += g
        lambdas += [_schedule(s.total_steps, int(args.warmup_ratio * s.total_steps))] * len(g)
    total_steps = max(s.total_steps for s in streams)
    device = next(reft.parameters()).device
    collator = Collator(pad_token_id, task, args.padding_side, device=device)
    opt = torch.optim.AdamW(groups, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    layout = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "seed": args.seed,
              "examples_in_data": sum(len(s.data) for s in streams)}
    if routed:
        layout["adapters"] = {s.name: len(s.data) for s in streams}
    dist.init(device)
    world = dist.world_size()
    if world > 1:
        dist.check_same(_run_summary(reft, streams, args, task, eval_data, resume, overwrite, layout))
        dist.check_batch_size(args.batch_size, world)
    ckpt = Path(args.output_dir) / "checkpoint" if args.output_dir else None
    if resume and overwrite:
        raise ConfigError("resume=True continues the run in output_dir and overwrite=True replaces it; pass one")
    dist.on_main(lambda: _prepare_folder(ckpt, args, resume, overwrite))
    args = replace(args, bf16=resolve_bf16(args.bf16, device))  # decided once; metrics record what ran
    if world > 1 and args.fsdp:
        dist.shard_layers(reft)
    model = dist.ddp(reft) if world > 1 and not args.fsdp else reft
    # dropout draws from an RNG seeded by args.seed (and restored on resume); the caller's RNG is left alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + RANK_SEED_STRIDE * dist.rank())
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "losses": [], "eval": [], "train_seconds": 0.0,
                 "examples": 0, "layout": layout}
        if routed:
            state.update(streams={s.name: [0, 0] for s in streams}, adapter_losses={s.name: [] for s in streams})
        if resume:
            state = _load_checkpoint(reft, opt, sched, ckpt)
            if state.get("layout") != layout:
                raise ConfigError(f"checkpoint {ckpt} was written with {state.get('layout')}, but this run has "
                                  f"{layout}; resume with the same data, batch_size, grad_accum and seed")
            if dist.is_main():
                log.info("resumed at step %d", state["step"])
        state["world_size"] = world
        bar = None
        if args.progress and dist.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", leave=False)
        try:
            with bf16_training_attention(reft, args):
                _loop(model, streams, args, task, collator, opt, sched, state, total_steps, ckpt, eval_data, bar)
        finally:
            if bar is not None:
                bar.close()
    del model
    reft.eval()
    state["examples_per_second"] = state["examples"] / max(state["train_seconds"], 1e-9)
    state["args"] = asdict(args)
    return state


def _prepare_folder(ckpt, args: TrainArgs, resume: bool, overwrite: bool) -> bool:
    if ckpt is not None and (resume or args.save_every):
        recover_folder(ckpt)  # a kill in the middle of a checkpoint write left it under a temporary name
    if resume and (ckpt is None or not (ckpt / "trainer_state.json").is_file()):
        raise ConfigError(f"nothing to resume: no checkpoint in {ckpt} (checkpoints need save_every > 0)")
    if ckpt is not None and args.save_every:
        check_output_folder(ckpt.parent, resume=resume, overwrite=overwrite)
    return True


def _run_summary(reft, streams, args, task, eval_data, resume, overwrite, layout) -> dict:
    """What every rank must agree on before the first collective of training."""
    return {"task": task, "layout": layout, "resume": resume, "overwrite": overwrite,
            "train": {k: v for k, v in asdict(args).items() if k not in ("progress",)},
            "data": {str(s.name): dist.fingerprint(s.data) for s in streams}, "eval_data": dist.fingerprint(eval_data),
            "adapters": {n: c.to_dict() for n, c in reft.configs.items()},
            "trainable": [[n, list(p.shape)] for n, p in reft.named_parameters() if p.requires_grad]}


def is_empty_folder(folder: Path) -> bool:
    """True when `folder` is missing or holds nothing but the leftovers of an earlier probe."""
    if not folder.exists():
        return True
    return not any(not p.name.startswith(".reftkit-probe-") for p in folder.iterdir())


def check_output_folder(folder: "str | Path", *, resume: bool, overwrite: bool,
                        flags: tuple[str, str] = ("resume=True", "overwrite=True")) -> Path:
    """Refuse to write into a non-empty `folder` unless the run resumes or replaces it; then probe that files can
    be written there. Both checks run before any training, and raise `OutputError` naming the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        check_writable(folder)  # raises: the output folder is a file
    if not (resume or overwrite) and not is_empty_folder(folder):
        raise OutputError(f"output folder {folder} is not empty (it holds an earlier run); pass {flags[0]} to "
                          f"continue that run, {flags[1]} to replace it, or choose another output folder")
    return check_writable(folder)


def _window(stream: Stream, state: dict, routed: bool, args: TrainArgs, cache: dict) -> list[list[Example]]:
    """The next `grad_accum` batches of `stream`, advancing its position (epoch, batch) in `state`."""
    epoch, b = state["streams"][stream.name] if routed else (state["epoch"], state["batch_in_epoch"])

    def batches(e):
        key = (stream.name, e)
        if key not in cache:
            cache.clear() if len(cache) > 64 else None
            cache[key] = _batches(stream.data, args, e)
        return cache[key]

    if b >= len(batches(epoch)):
        epoch, b = epoch + 1, 0
    window = batches(epoch)[b: b + args.grad_accum]
    b += args.grad_accum
    if b >= len(batches(epoch)):
        epoch, b = epoch + 1, 0
    if routed:
        state["streams"][stream.name] = [epoch, b]
    else:
        state["epoch"], state["batch_in_epoch"] = epoch, b
    return window


def _loop(model, streams: list[Stream], args: TrainArgs, task: str, collator, opt, sched, state: dict,
          total_steps: int, ckpt, eval_data, bar) -> None:
    reft = unwrap(model)
    reft.train()
    t0 = time.perf_counter() - state["train_seconds"]
    rank, world = dist.rank(), dist.world_size()
    routed = len(streams) > 1 or streams[0].name is not None
    trainable = [p for g in opt.param_groups for p in g["params"]]
    cache: dict = {}
    while state["step"] < total_steps:
        live = [(k, _window(s, state, routed, args, cache)) for k, s in enumerate(streams)
                if state["step"] < s.total_steps]
        micro = [[(k, ex) for k, w in live if j < len(w) for ex in w[j]] for j in range(max(len(w) for _, w in live))]
        shares = []  # this rank's rows of each micro-batch: (stream indices, collated batch, ghost)
        counts = torch.zeros(len(streams), dtype=torch.float64)
        for rows in micro:
            local = dist.split(rows, rank, world)
            ghost = not local  # a rank without rows runs one row with weight 0, so DDP's collectives still match
            local = local or rows[:1]
            batch = collator([ex for _, ex in local])
            if routed:
                names = [streams[k].name for k, _ in local]
                batch["adapter_names"] = names * 2 if task == "dpo" else names  # dpo: chosen rows, then rejected
                if not ghost:
                    counts.index_add_(0, torch.tensor([k for k, _ in local]), row_items(batch, task).double())
            elif not ghost:
                counts[0] += batch_items(batch, task)
            shares.append(([k for k, _ in local], batch, ghost))
        items = dist.all_sum(counts).clamp(min=1)
        losses = torch.zeros(len(streams) + 1, dtype=torch.float64)
        for j, (ks, batch, ghost) in enumerate(shares):
            sync = model is reft or j == len(shares) - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with _autocast(reft, args.bf16):
                    if routed:
                        per_row = row_losses(model, batch, task, args.dpo_beta)
                        weights = (0.0 if ghost else 1.0) / items[ks].to(per_row.device, per_row.dtype)
                        loss = (per_row * weights).sum()
                        losses[1:].index_add_(0, torch.tensor(ks), (per_row * weights).detach().double().cpu())
                    else:
                        loss = task_loss(model, batch, task, args.dpo_beta, num_items=int(items[0]))
                        loss = loss * 0.0 if ghost else loss
                    if model is not reft:  # every trainable tensor takes part in each backward DDP reduces
                        loss = loss + 0.0 * sum(p.sum() for p in trainable)
                loss.backward()
                losses[0] += float(loss.detach())
        losses = dist.all_sum(losses) if world > 1 else losses
        if model is reft:  # FSDP-sharded layers: the whole interventions' gradients are summed here
            dist.sum_gradients(trainable)
        active = {k for k, _ in live}
        for k, s in enumerate(streams):
            params = [p for i in s.groups for p in opt.param_groups[i]["params"]]
            if k not in active:  # a finished adapter stays as it is (its zero gradients are dropped)
                for p in params:
                    p.grad = None
            elif args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["examples"] += sum(len(rows) for rows in micro)
        step_loss = float(losses[0])
        state["losses"].append(step_loss)
        if routed:
            for k in sorted(active):
                state["adapter_losses"][streams[k].name].append(float(losses[1 + k]))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if eval_data and args.eval_every and state["step"] % args.eval_every == 0:
            state["eval"].append([state["step"], evaluate(reft, eval_data, collator, args, task)])
        if ckpt is not None and args.save_every and state["step"] % args.save_every == 0:
            state["train_seconds"] = time.perf_counter() - t0
            _save_checkpoint(reft, opt, sched, state, ckpt)
    state["train_seconds"] = time.perf_counter() - t0
    if eval_data and not (state["eval"] and state["eval"][-1][0] == state["step"]):
        state["eval"].append([state["step"], evaluate(reft, eval_data, collator, args, task)])
    if ckpt is not None and args.save_every:
        _save_checkpoint(reft, opt, sched, state, ckpt)
