"""The precision of calibration forwards (`calib_dtype`): float32, or bfloat16 autocast, where each block's
matmuls and attention run in bfloat16 while weights, norms, residual sums and every statistic stay float32
(GPTQ's Hessians, AWQ's losses, Wanda's norms are accumulated in float32 from the bfloat16-rounded inputs).
On a CPU with native bfloat16 dot products (AVX512-BF16, AMX) a block's forward runs about twice as fast;
elsewhere bfloat16 is emulated and slower, so `auto` picks it only where the CPU has it. The step's record
says which precision ran (`calibration_precision`)."""
from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar

import torch

_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("slimctl_calibration_autocast", default=None)


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(setting: str, auto_bf16: bool = True) -> str:
    """'float32' or 'bfloat16' for a calib_dtype setting ('auto' follows native_bf16, or on a calibration GPU
    torch.cuda.is_bf16_supported, where the step allows it)."""
    from .placement import device_type

    if setting == "auto":
        native = torch.cuda.is_bf16_supported() if device_type() == "cuda" else native_bf16()
        return "bfloat16" if auto_bf16 and native else "float32"
    return setting


@contextlib.contextmanager
def calibration_precision(setting: str, auto_bf16: bool = True):
    """Within it, forward() gives the autocast context of the chosen precision; yields the precision used."""
    used = resolve(setting, auto_bf16)
    token = _AUTOCAST.set(torch.bfloat16 if used == "bfloat16" else None)
    try:
        yield used
    finally:
        _AUTOCAST.reset(token)


def forward():
    """The context a calibration forward runs in: bfloat16 autocast when chosen, else nothing."""
    from .placement import device_type

    dtype = _AUTOCAST.get()
    return torch.autocast(device_type(), dtype=dtype) if dtype is not None else contextlib.nullcontext()
