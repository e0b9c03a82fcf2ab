"""Devices and dtypes by name: `resolve_device("auto")`, `resolve_dtype("bf16")`, checked before anything is
loaded, with errors that list what exists on this machine. torch is imported when a function is called."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reftkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
               "float64": "float64", "fp64": "float64", "double": "float64"}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """A torch floating dtype for `dtype` (None is float32), or "auto" (left to the model's config)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
        raise ConfigError(f"dtype {dtype} is not a floating dtype; expected float32, bfloat16, float16 or auto")
    if isinstance(dtype, str):
        text = dtype.strip().lower().removeprefix("torch.")
        if text == "auto":
            return "auto"
        if text in DTYPE_NAMES:
            return getattr(torch, DTYPE_NAMES[text])
    raise ConfigError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16 (bf16), float16 (fp16), float64 "
                      "or auto (the dtype in the model's config)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device this machine has, for `device` ("cpu", "cuda", "cuda:1", "mps", "auto", a torch.device; None
    is cpu). "auto" is cuda when available, then mps, else cpu."""
    import torch

    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda, cuda:<index>, mps or auto")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {device!r} is not available ({why}); use device 'cpu' or 'auto'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!r} is not available on this machine; use device 'cpu' or 'auto'")
    elif resolved.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ConfigError(f"device {device!r} is not available on this machine; use device 'cpu' or 'auto'")
    return resolved
