"""Where a recipe's calibration runs (the recipe's `device`, `--device cuda`): the block-sequential steps move each
block and its calibration inputs to that device for the forwards, the input statistics and the solves (GPTQ's
column loop, AWQ's grid, the Hessian factorisations), then move the block back to the CPU before the next one. The
whole model never has to fit on the GPU, and the artifact is written from CPU tensors in the same format as a CPU
run. Inside a block's turn the device is also torch's default device, so the tensors a technique creates without
naming a device (accumulators, index ranges) land beside the block's. Steps that run no calibration forwards
(rtn, magnitude, casts) stay on the CPU, where they are cheap."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..errors import DeviceError
from ..stream.blocks import map_tensors

_DEVICE: ContextVar[torch.device | None] = ContextVar("slimctl_calibration_device", default=None)
DEVICES = ("cpu", "cuda")


def check(name: str, what: str = "calibration") -> torch.device:
    """The torch device for a `device` setting, or DeviceError when it cannot run here."""
    if name not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device cuda was asked for ({what} on the GPU), but this machine has no CUDA GPU "
                          "that torch can see; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def calibration_device(name: str = "cpu"):
    """Within it, the block-sequential steps calibrate on `name` (cpu: exactly as without it)."""
    dev = check(name)
    token = _DEVICE.set(dev if dev.type != "cpu" else None)
    try:
        yield dev
    finally:
        _DEVICE.reset(token)


def current() -> torch.device | None:
    """The accelerator calibration runs on, or None for the CPU."""
    return _DEVICE.get()


def device_type() -> str:
    """'cpu' or the accelerator's type (for torch.autocast)."""
    dev = _DEVICE.get()
    return dev.type if dev is not None else "cpu"


def to_device(obj: Any, dev: torch.device | str | None) -> Any:
    """obj with every tensor inside (tuples, lists, dicts) moved to `dev`; anything else kept. None: obj itself."""
    return obj if dev is None else map_tensors(obj, lambda t: t.to(dev))


@contextlib.contextmanager
def block_on_device(block: nn.Module):
    """The block's turn: on the calibration device (and that device torch's default) inside, back on the CPU after.
    On the CPU: nothing moves."""
    dev = _DEVICE.get()
    if dev is None:
        yield block
        return
    block.to(dev)
    try:
        with dev:
            yield block
    finally:
        block.to("cpu")  # a copy to the host: waits for the block's queued GPU work
