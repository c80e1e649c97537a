"""bf16 / fp16 cast of the whole model: the simplest slimming, and often the fastest on modern CPUs."""
from __future__ import annotations

import torch

from .registry import Proposal, StepContext, TechniqueConfig, register

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CastConfig(TechniqueConfig):
    pass


def cast_model(model, dtype: torch.dtype) -> None:
    """Cast the weights, but not the non-persistent buffers (rotary inv_freq, position ids):
    transformers rebuilds those in float32 when a saved model is loaded, so casting them would make
    the in-memory model differ from the artifact everyone else loads."""
    keep = [(mod, b, buf) for mod in model.modules() for b in getattr(mod, "_non_persistent_buffers_set", ())
            if (buf := getattr(mod, b, None)) is not None]
    model.to(dtype)
    for mod, b, buf in keep:
        setattr(mod, b, buf)


def _cast(name: str):
    def apply(model, cfg: CastConfig, ctx: StepContext) -> dict:
        before = {p.dtype for p in model.parameters()}
        cast_model(model, _DTYPES[name])
        model.config.dtype = _DTYPES[name]
        if name == "fp16":
            ctx.notes.append("fp16 on CPU is emulated by most kernels and is usually slower than fp32; bf16 is the CPU choice")
        return {"dtype": str(_DTYPES[name]).replace("torch.", ""), "from": sorted(str(d).replace("torch.", "") for d in before)}
    return apply


for _name in _DTYPES:
    register(_name, "cast", CastConfig, f"cast every weight to {_name}; reloads with plain transformers",
             proposals=(Proposal("bf16", order=10),) if _name == "bf16" else ())(_cast(_name))
