"""Checkpoints of the plain training loop: every trainable tensor as the optimizer sees it, the optimizer and
scheduler state, and every rank's RNG state, written atomically by rank 0 and read back by it for all ranks, so a
resumed run continues bit for bit (see `train.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import write_folder
from ..errors import ConfigError
from . import distributed as dist
from .model import ReftModel


def unwrap(model):
    """The `ReftModel` inside a DDP wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def raw_state(reft: ReftModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor as the optimizer sees it (raw parametrization parameters, not the computed
    matrices of the compact adapter format), so a resumed run continues bit-for-bit."""
    state = {f"p.{k}": v.detach().cpu().contiguous() for k, v in reft.named_parameters() if v.requires_grad}
    state.update({f"b.{k}": v.detach().cpu().contiguous() for k, v in reft.adapters.named_buffers()})
    return state


def load_raw_state(reft: ReftModel, raw: dict[str, torch.Tensor], where) -> None:
    """Copy tensors saved by `raw_state` into the model in place (the optimizer keeps its parameters)."""
    params = dict(reft.named_parameters())
    buffers = dict(reft.adapters.named_buffers())
    with torch.no_grad():
        for key, v in raw.items():
            kind, _, name = key.partition(".")
            target = params.get(name) if kind == "p" else buffers.get(name)
            if target is None or target.shape != v.shape:
                raise ConfigError(f"checkpoint {where} does not match this adapter ({name})")
            target.copy_(v)


def _save_checkpoint(reft, opt, sched, state: dict, directory: Path) -> None:
    """Every rank calls this (the RNG states are gathered); rank 0 writes, and a failed write is raised on every
    rank."""
    rng = dist.gather_tensors(dist.rng_state())
    reft = unwrap(reft)

    def write():
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
                     {"optimizer.safetensors": tensors, "model_state.safetensors": raw_state(reft),
                      "rng_state.safetensors": rng})

    dist.on_main(write)


CHECKPOINT_FILES = ("optimizer.json", "optimizer.safetensors", "model_state.safetensors", "rng_state.safetensors",
                    "trainer_state.json")


def _read_checkpoint(directory: Path) -> dict[str, bytes]:
    """The checkpoint's files, read on rank 0 and broadcast to every rank (no other rank needs the folder)."""
    files = {}

    def read() -> bool:
        try:
            files.update({name: (directory / name).read_bytes() for name in CHECKPOINT_FILES})
        except OSError as e:
            raise ConfigError(f"checkpoint {directory} is unreadable ({e}); delete it to start afresh") from e
        return True

    dist.on_main(read)
    if dist.world_size() == 1:
        return files
    return {name: dist.broadcast_bytes(files.get(name)) for name in CHECKPOINT_FILES}


def _load_checkpoint(reft, opt, sched, directory: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    files = _read_checkpoint(directory)
    try:
        meta = json.loads(files["optimizer.json"])
        tensors = load(files["optimizer.safetensors"])
        raw = load(files["model_state.safetensors"])
        rng = load(files["rng_state.safetensors"])
        state = json.loads(files["trainer_state.json"])
    except (KeyError, ValueError, SafetensorError) as e:
        raise ConfigError(f"checkpoint {directory} is unreadable ({e}); delete it to start afresh") from e
    opt_state = {int(pid): dict(st) for pid, st in meta["state"].items()}
    for key, v in tensors.items():
        pid, _, k = key.partition(".")
        opt_state[int(pid)][k] = v
    load_raw_state(unwrap(reft), raw, directory)
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    dist.restore_rng(rng, state.get("world_size", 1), uses_dropout(unwrap(reft)), directory)
    return state


def uses_dropout(reft: ReftModel) -> bool:
    """Whether training draws random numbers: a dropout module with p > 0 or a base config with dropout > 0."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in reft.modules()):
        return True
    config = getattr(reft.model, "config", None)
    values = vars(config).items() if config is not None else ()
    return any(("dropout" in k or k.endswith("pdrop")) and isinstance(v, (int, float)) and v > 0 for k, v in values)
