"""Which precision to train in: bf16 autocast only where the hardware computes bf16 natively.

bf16 autocast is a speed choice, and its effect depends on the processor. Where bf16 is native (CUDA devices
that support it; x86 CPUs with AVX-512 BF16 or AMX and an ATen/oneDNN build allowed to use them; ARM CPUs with
the BF16 extension) it is faster than fp32. Elsewhere every bf16 matmul is emulated through fp32 conversions:
on an AVX2-only CPU a SmolLM2 LoReFT step took 47 s in bf16 against 2 s in fp32. So the setting is three-valued:

- `"auto"` (the default): bf16 where native, fp32 elsewhere, decided once per run from the model's device;
- `True`: bf16 autocast regardless; on a device without native bf16 it still runs and warns once, with the
  reason, so the slowdown is never a surprise;
- `False`: fp32.

The check is `bf16_support(device)`; it reads the processor's features and the capability ATen runs with, so a
CPU path restricted by `ATEN_CPU_CAPABILITY` or `ONEDNN_MAX_CPU_ISA` counts as not native.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from functools import lru_cache

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL")


class SlowPrecisionWarning(UserWarning):
    """bf16 was asked for on a device that has no native bf16 arithmetic: it runs, much slower than fp32."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=None)
def _cpu_bf16_support() -> tuple[bool, str]:
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64", "i686"):
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        has_bf16 = bool(probe() if probe else "avx512_bf16" in flags) or bool(amx() if amx else "amx_bf16" in flags)
        if not has_bf16:
            return False, "this CPU has neither AVX-512 BF16 nor AMX (bf16 is emulated through fp32)"
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.upper().startswith("AVX512"):
            return False, f"ATen runs with CPU capability {capability} (ATEN_CPU_CAPABILITY), below AVX-512"
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if onednn and not onednn.startswith(_ONEDNN_BF16_ISAS):
            return False, f"oneDNN is restricted to {onednn} (ONEDNN_MAX_CPU_ISA), below AVX512_CORE_BF16"
        return True, "the CPU has native bf16 (AVX-512 BF16 / AMX)"
    if machine in ("aarch64", "arm64"):
        if "bf16" in flags:
            return True, "the CPU has the Arm BF16 extension"
        return False, "this Arm CPU lacks the BF16 extension (bf16 is emulated through fp32)"
    return False, f"no native bf16 is known for {machine or 'this'} processors"


def bf16_support(device: "torch.device | str") -> tuple[bool, str]:
    """(native, reason): whether bf16 arithmetic is native on `device`, and why (for logs and warnings)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the emulation flag
            native = torch.cuda.is_bf16_supported()
        if native:
            return True, f"{torch.cuda.get_device_name(index)} supports bf16"
        return False, f"{torch.cuda.get_device_name(index)} has no native bf16"
    if device.type == "cpu":
        return _cpu_bf16_support()
    if device.type in ("mps", "xpu"):
        return True, f"{device.type} devices compute bf16 natively"
    return False, f"no native bf16 is known for {device.type} devices"


def check_bf16_setting(value, where: str = "bf16") -> None:
    if not (value is True or value is False or value == "auto"):
        raise ConfigError(f"{where} must be 'auto', true or false, got {value!r}")


def resolve_bf16(setting, device: "torch.device | str", *, warn: bool = True) -> bool:
    """The bf16 decision for a run on `device`: `"auto"` -> native support; `True` -> True (warning once per
    call site if not native); `False` -> False."""
    check_bf16_setting(setting)
    if setting is False:
        return False
    native, reason = bf16_support(device)
    if setting == "auto":
        log.info("precision: %s (%s)", "bf16 autocast" if native else "fp32", reason)
        return native
    if not native and warn:
        warnings.warn(f"bf16 autocast was requested, but {reason}: it will run much slower than fp32. "
                      "Use bf16='auto' (the default) or False on this device.", SlowPrecisionWarning, stacklevel=3)
    return True
