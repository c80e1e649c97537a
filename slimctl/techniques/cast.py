"""bf16 / fp16 cast of the whole model: the simplest slimming, and often the fastest on modern CPUs."""
from __future__ import annotations

import torch

from . import StepContext, TechniqueConfig, register

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CastConfig(TechniqueConfig):
    pass


def _cast(name: str):
    def apply(model, cfg: CastConfig, ctx: StepContext) -> dict:
        before = {p.dtype for p in model.parameters()}
        model.to(_DTYPES[name])
        if ctx.kind and name == "fp16":
            ctx.notes.append("fp16 on CPU is emulated by most kernels and is usually slower than fp32; bf16 is the CPU choice")
        return {"dtype": str(_DTYPES[name]).replace("torch.", ""), "from": sorted(str(d).replace("torch.", "") for d in before)}
    return apply


for _name in _DTYPES:
    register(_name, "cast", CastConfig, f"cast every weight to {_name}; reloads with plain transformers")(_cast(_name))
