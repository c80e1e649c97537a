"""Magnitude pruning of Linear weights: zero the smallest |w|, per layer, globally, or N:M."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from ..quant.sparsity import nm_mask
from .pruning import PruneOptions, account, check_pattern
from ..stream.skeleton import refuse, stream_of, visit
from .registry import StepContext, register, select_linears


class MagnitudeConfig(PruneOptions):
    scope: Literal["layer", "global"] = "layer"

    @model_validator(mode="after")
    def _global_is_unstructured(self):
        if self.scope == "global" and self.pattern is not None:
            raise ValueError("scope 'global' applies to unstructured sparsity, not to an N:M pattern")
        return self


@register("magnitude", "prune", MagnitudeConfig,
          "zero the smallest-magnitude Linear weights (per layer, global, or N:M); reloads with plain transformers", streams=True)
def apply(model, cfg: MagnitudeConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    check_pattern(layers, cfg)
    per_layer, zeros = {}, {}
    with torch.no_grad():
        if cfg.scope == "global" and stream_of(model):
            refuse("scope: global (one threshold over every layer)")
        if cfg.scope == "global" and layers:
            flat = torch.cat([lin.weight.detach().abs().flatten().float() for _, lin in layers])
            k = int(round(cfg.sparsity * flat.numel()))
            threshold = flat.kthvalue(max(k, 1)).values.item() if k > 0 else -1.0
            del flat
        for name, lin in visit(model, layers):
            w = lin.weight
            score = w.detach().abs().float()
            if cfg.nm:
                mask = nm_mask(score, *cfg.nm)
            elif cfg.scope == "global":
                mask = score <= threshold
            else:  # exactly round(s * n) weights per layer, ties broken by position
                k = int(round(cfg.sparsity * w.numel()))
                mask = torch.zeros(w.numel(), dtype=torch.bool)
                if k:
                    mask[torch.topk(score.flatten(), k, largest=False).indices] = True
                mask = mask.view_as(w)
            w.masked_fill_(mask, 0)  # permanent: no mask reparametrisation is left on the module
            per_layer[name] = float(mask.float().mean())
            zeros[name] = int((w == 0).sum())
    return account(model, per_layer, cfg, {"scope": cfg.scope}, zeros)
