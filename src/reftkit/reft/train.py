"""Training ReFT adapters: a plain PyTorch loop with atomic, resumable checkpoints.

- Tasks: `sft` (loss on completion tokens only), `classification` (the model's own head and loss; list the head
  in `modules_to_save` to train it) and `dpo` (the reference model is the same model with adapters disabled,
  so no second copy is held in memory).
- Gradient accumulation, periodic evaluation, an optional bf16 autocast path for CPUs and GPUs that have it.
- Checkpoints hold the adapter (config + safetensors), the optimizer state (safetensors + JSON) and the loop
  state; they are written atomically every `save_every` steps, so a kill loses at most that interval, and
  `resume=True` continues from the last one with the same data order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from ..atomic import write_folder
from ..errors import ConfigError, DataError
from .data import Collator, Example
from .model import ReftModel

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    epochs: float = 3
    batch_size: int = 8
    lr: float = 4e-3
    weight_decay: float = 0.0
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    eval_every: int = 0
    save_every: int = 0
    output_dir: str | None = None
    seed: int = 0
    bf16: bool = False
    dpo_beta: float = 0.1
    padding_side: str = "right"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


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


def _loss(reft: ReftModel, batch: dict, task: str, beta: float) -> torch.Tensor:
    if task != "dpo":
        return reft(**batch).loss
    B = batch["input_ids"].shape[0] // 2
    policy = sequence_logprobs(reft, batch)
    with torch.no_grad(), reft.disable_adapter():
        ref = sequence_logprobs(reft, batch)
    margin = (policy[:B] - ref[:B]) - (policy[B:] - ref[B:])
    return -F.logsigmoid(beta * margin).mean()


def _batches(data: list[Example], args: TrainArgs, epoch: int) -> list[list[Example]]:
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(data), generator=g).tolist()
    return [[data[i] for i in order[s: s + args.batch_size]] for s in range(0, len(order), args.batch_size)]


def _raw_state(reft: ReftModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor as the optimizer sees it (raw parametrization parameters, not the computed
    matrices of the compact adapter format), so a resumed run continues bit-for-bit."""
    state = {f"p.{k}": v.detach().cpu().contiguous() for k, v in reft.named_parameters() if v.requires_grad}
    state.update({f"b.{k}": v.detach().cpu().contiguous() for k, v in reft.adapters.named_buffers()})
    return state


def _save_checkpoint(reft, opt, sched, state: dict, directory: Path) -> None:
    tensors, meta = {}, {"param_groups": opt.state_dict()["param_groups"], "state": {}}
    for pid, st in opt.state_dict()["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][k] = v
    meta["scheduler"] = sched.state_dict()
    write_folder(directory, {"trainer_state.json": json.dumps(state), "optimizer.json": json.dumps(meta)},
                 {"optimizer.safetensors": tensors, "model_state.safetensors": _raw_state(reft)})


def _load_checkpoint(reft, opt, sched, directory: Path) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {int(pid): dict(st) for pid, st in meta["state"].items()}
    for key, v in tensors.items():
        pid, _, k = key.partition(".")
        state[int(pid)][k] = v
    raw = load_file(str(directory / "model_state.safetensors"))
    params = dict(reft.named_parameters())
    buffers = dict(reft.adapters.named_buffers())
    with torch.no_grad():
        for key, v in raw.items():
            kind, _, name = key.partition(".")
            target = params.get(name) if kind == "p" else buffers.get(name)
            if target is None or target.shape != v.shape:
                raise ConfigError(f"checkpoint {directory} does not match this adapter ({name})")
            target.copy_(v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    return json.loads((directory / "trainer_state.json").read_text())


def param_groups(reft: ReftModel, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: rotations (whose raw parameter must never decay: the Householder
    map reads its diagonal as signs) and the rest."""
    no_decay = set()
    for prefix, mod in reft.named_modules():
        if hasattr(mod, "no_weight_decay"):
            no_decay |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    decay, keep = [], []
    for name, p in reft.named_parameters():
        if p.requires_grad:
            (keep if name in no_decay else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0})
            if g["params"]]


def evaluate(reft: ReftModel, data: list[Example], collator: Collator, args: TrainArgs, task: str) -> float:
    reft.eval()
    total, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        for s in range(0, len(data), args.batch_size):
            batch = collator(data[s: s + args.batch_size])
            total += float(_loss(reft, batch, task, args.dpo_beta)) * len(data[s: s + args.batch_size])
            n += len(data[s: s + args.batch_size])
    return total / max(n, 1)


def train(reft: ReftModel, data: list[Example], args: TrainArgs, *, task: str = "sft", pad_token_id: int = 0,
          eval_data: list[Example] | None = None, resume: bool = False) -> dict:
    """Train the active adapter. Returns metrics: per-step losses, eval losses, time, examples/s."""
    if not data:
        raise DataError("the training set is empty")
    groups = param_groups(reft, args.weight_decay)
    if not groups:
        raise ConfigError("nothing to train: the adapter has no trainable parameters")
    collator = Collator(pad_token_id, task, args.padding_side)
    steps_per_epoch = math.ceil(math.ceil(len(data) / args.batch_size) / args.grad_accum)
    total_steps = args.max_steps or max(1, int(math.ceil(steps_per_epoch * args.epochs)))
    opt = torch.optim.AdamW(groups, lr=args.lr)
    warm = int(args.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warm, 1) if s < warm else max(0.0, (total_steps - s) / max(total_steps - warm, 1)))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "losses": [], "eval": [], "train_seconds": 0.0, "examples": 0}
    ckpt = Path(args.output_dir) / "checkpoint" if args.output_dir else None
    if resume:
        if ckpt is None or not (ckpt / "trainer_state.json").is_file():
            raise ConfigError(f"nothing to resume: no checkpoint in {ckpt}")
        state = _load_checkpoint(reft, opt, sched, ckpt)
        log.info("resumed at step %d", state["step"])
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", leave=False)
    reft.train()
    t0 = time.perf_counter() - state["train_seconds"]
    micro, accum_loss = 0, 0.0
    while state["step"] < total_steps:
        batches = _batches(data, args, state["epoch"])
        for bi in range(state["batch_in_epoch"], len(batches)):
            batch = collator(batches[bi])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = _loss(reft, batch, task, args.dpo_beta) / args.grad_accum
            loss.backward()
            accum_loss += float(loss.detach())
            micro += 1
            state["examples"] += len(batches[bi])
            state["batch_in_epoch"] = bi + 1
            if micro % args.grad_accum and bi + 1 < len(batches):
                continue
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["losses"].append(accum_loss)
            micro, accum_loss = 0, 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
            if eval_data and args.eval_every and state["step"] % args.eval_every == 0:
                state["eval"].append([state["step"], evaluate(reft, eval_data, collator, args, task)])
                reft.train()
            if ckpt is not None and args.save_every and state["step"] % args.save_every == 0:
                state["train_seconds"] = time.perf_counter() - t0
                _save_checkpoint(reft, opt, sched, state, ckpt)
            if state["step"] >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if bar is not None:
        bar.close()
    state["train_seconds"] = time.perf_counter() - t0
    if eval_data:
        state["eval"].append([state["step"], evaluate(reft, eval_data, collator, args, task)])
    if ckpt is not None and args.save_every:
        _save_checkpoint(reft, opt, sched, state, ckpt)
    reft.eval()
    state["examples_per_second"] = state["examples"] / max(state["train_seconds"], 1e-9)
    state["args"] = asdict(args)
    return state
