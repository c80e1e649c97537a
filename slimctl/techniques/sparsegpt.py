"""SparseGPT (Frantar & Alistarh 2023): choose each column block's mask by w² / [H⁻¹]²_jj and update
the remaining weights with the OBS correction, from the Hessian of calibration inputs, one block of
the model at a time; unstructured or N:M."""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from .calibrate import calibrated, raised_dampening, summary
from .hessian import InputStats, hessian_start, inverse_hessian_factor, relative_output_error
from .pruning import PruneOptions, account, check_pattern, prune_unseen
from .registry import CalibrationOptions, StepContext, register, select_linears


class SparseGPTConfig(PruneOptions, CalibrationOptions):
    dampening: float = Field(default=0.01, gt=0, le=1)  # fraction of mean(diag H) added to the diagonal
    block_size: int = Field(default=128, ge=8, le=4096)  # columns per mask-selection / lazy-update block

    @model_validator(mode="after")
    def _block_holds_groups(self):
        if self.nm and self.block_size % self.nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={self.nm[1]} of the pattern")
        return self


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, cfg: SparseGPTConfig, layer: str = "a layer",
                    damping: dict[str, float] | None = None) -> tuple[torch.Tensor, float]:
    """The pruned weight (zeros where masked, the rest updated) and the summed OBS loss."""
    w, h = hessian_start(w, h)
    out_f, in_f = w.shape
    hinv = inverse_hessian_factor(h, cfg.dampening, layer, damping)
    nm = cfg.nm
    loss = 0.0
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if nm is None:  # adaptive mask: the lowest w²/d² of this column block, over all rows
            score = w1 ** 2 / d[None, :] ** 2
            k = int(score.numel() * cfg.sparsity)
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:  # N:M: choose this group's mask from the already-updated weights
                m = nm[1]
                score = w1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(score, m - nm[0], dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            loss += float((e ** 2).sum()) / 2
            w1[:, i:] -= e[:, None] @ hinv1[i:i + 1, i:]
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, loss


@register("sparsegpt", "prune", SparseGPTConfig,
          "SparseGPT: Hessian-based mask with OBS weight update, unstructured or N:M, block by block; reloads with plain transformers", streams=True)
def apply(model, cfg: SparseGPTConfig, ctx: StepContext) -> dict:
    targets = dict(select_linears(model, cfg.ignore))
    check_pattern(list(targets.items()), cfg)
    batches = cfg.batches(ctx)
    per_layer: dict[str, float] = {}
    zeros: dict[str, int] = {}
    errors: dict[str, float] = {}
    damping: dict[str, float] = {}

    def prune(mine: dict, stats: InputStats) -> None:
        for name, lin in mine.items():
            w = lin.weight.detach().float()
            new, _ = sparsegpt_prune(w, stats.hessian[name], cfg, name, damping)
            errors[name] = relative_output_error(w, new, stats.hessian[name])
            with torch.no_grad():
                lin.weight.copy_(new.to(lin.weight.dtype))
            per_layer[name] = float((lin.weight == 0).float().mean())
            zeros[name] = int((lin.weight == 0).sum())

    calibrated(model, targets, batches, prune, hessian=True, track=ctx.track,
               unseen=prune_unseen(cfg, per_layer, zeros, ctx, "sparsegpt"))
    return account(model, per_layer, cfg, {"calibration": summary(batches), "relative_output_error": errors,
                                           **raised_dampening(damping, cfg.dampening, ctx)}, zeros)
