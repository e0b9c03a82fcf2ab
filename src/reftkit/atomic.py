"""Atomic folder writes: files are written into a temporary sibling folder and swapped in with `os.replace`,
so a crash or kill never leaves a half-written adapter or checkpoint behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def write_folder(target: "str | os.PathLike", texts: dict[str, str] | None = None,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `texts` (name -> text) and `tensors` (name -> safetensors state dict) as the folder `target`.
    Files already in `target` that are not rewritten are kept (sub-folders of other adapters survive)."""
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        if target.is_dir():
            for item in target.iterdir():
                if item.name not in (texts or {}) and item.name not in (tensors or {}):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        for name, state in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name))
        # mkdtemp makes a private folder; give the result the permissions a plain mkdir/open would have
        os.chmod(tmp, 0o777 & ~umask)
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o666 & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
