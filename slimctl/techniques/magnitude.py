"""Unstructured magnitude pruning of Linear weights: zero the smallest |w|, per layer or globally."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from . import LayerSelection, StepContext, register, select_linears


class MagnitudeConfig(LayerSelection):
    sparsity: float = Field(gt=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"


@register("magnitude", "prune", MagnitudeConfig,
          "zero the smallest-magnitude Linear weights (per layer or global); reloads with plain transformers")
def apply(model, cfg: MagnitudeConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    if not layers:
        return {"layers": {}, "sparsity": 0.0}
    with torch.no_grad():
        if cfg.scope == "global":
            flat = torch.cat([lin.weight.detach().abs().flatten().float() for _, lin in layers])
            k = int(round(cfg.sparsity * flat.numel()))
            threshold = flat.kthvalue(max(k, 1)).values.item() if k > 0 else -1.0
            del flat
        per_layer = {}
        zeros = total = 0
        for name, lin in layers:
            w = lin.weight
            if cfg.scope == "global":
                mask = w.abs().float() <= threshold
            else:  # exactly round(s * n) weights per layer, ties broken by position
                k = int(round(cfg.sparsity * w.numel()))
                mask = torch.zeros(w.numel(), dtype=torch.bool)
                if k:
                    mask[torch.topk(w.detach().abs().flatten().float(), k, largest=False).indices] = True
                mask = mask.view_as(w)
            w.masked_fill_(mask, 0)  # permanent: no mask reparametrisation is left on the module
            nz = int(mask.sum())
            per_layer[name] = nz / w.numel()
            zeros += nz
            total += w.numel()
    return {"layers": per_layer, "sparsity": zeros / total, "scope": cfg.scope, "pruned_params": zeros}
