"""Wanda (Sun et al. 2023): prune by |W| × ‖X‖₂ of each input feature over calibration data,
compared within each output row (or within each N:M group), one block of the model at a time."""
from __future__ import annotations

import torch

from .calibrate import calibrated, summary
from .hessian import InputStats
from ..quant.sparsity import nm_mask, row_mask
from .pruning import PruneOptions, account, check_pattern, prune_unseen
from .registry import CalibrationOptions, StepContext, register, select_linears


class WandaConfig(PruneOptions, CalibrationOptions):
    pass


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, cfg: PruneOptions) -> torch.Tensor:
    score = w.detach().abs().float() * sq_norm.sqrt()[None, :]
    return nm_mask(score, *cfg.nm) if cfg.nm else row_mask(score, cfg.sparsity)


@register("wanda", "prune", WandaConfig,
          "Wanda: |weight| x input-activation norm, per output row or N:M, calibrated block by block; reloads with plain transformers", streams=True)
def apply(model, cfg: WandaConfig, ctx: StepContext) -> dict:
    targets = dict(select_linears(model, cfg.ignore))
    check_pattern(list(targets.items()), cfg)
    batches = cfg.batches(ctx)
    per_layer: dict[str, float] = {}
    zeros: dict[str, int] = {}

    def prune(mine: dict, stats: InputStats) -> None:
        with torch.no_grad():
            for name, lin in mine.items():
                mask = wanda_mask(lin.weight, stats.sq_norm[name], cfg)
                lin.weight.masked_fill_(mask, 0)
                per_layer[name] = float(mask.float().mean())
                zeros[name] = int((lin.weight == 0).sum())

    calibrated(model, targets, batches, prune, track=ctx.track, unseen=prune_unseen(cfg, per_layer, zeros, ctx, "wanda"))
    return account(model, per_layer, cfg, {"calibration": summary(batches)}, zeros)
