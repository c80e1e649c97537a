"""What every pruning technique shares: its options (unstructured sparsity or an N:M pattern), the
check that a pattern fits the layers, and the per-layer / whole-model accounting each step reports."""
from __future__ import annotations

import re
from typing import Optional

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import UnsupportedError
from .registry import LayerSelection


class PruneOptions(LayerSelection):
    """Exactly one of `sparsity` (unstructured: this fraction of each layer's weights become zero)
    or `pattern` ("N:M": at most N non-zeros in every M consecutive input weights, e.g. "2:4")."""

    sparsity: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    pattern: Optional[str] = None

    @field_validator("pattern")
    @classmethod
    def _nm(cls, v):
        if v is None:
            return v
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", v)
        if not m or not (0 < int(m.group(1)) < int(m.group(2)) <= 64):
            raise ValueError(f"pattern must be 'N:M' with 0 < N < M <= 64 (non-zeros kept per M weights), e.g. '2:4'; got {v!r}")
        return f"{int(m.group(1))}:{int(m.group(2))}"

    @model_validator(mode="after")
    def _one_of(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give either sparsity (e.g. 0.5, unstructured) or pattern (e.g. '2:4'), not both or neither")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def target(self) -> float:
        """The fraction of each pruned layer's weights that becomes zero."""
        if self.nm:
            n, m = self.nm
            return 1 - n / m
        return float(self.sparsity)


def check_pattern(layers: list[tuple[str, torch.nn.Linear]], cfg: PruneOptions) -> None:
    if cfg.nm is None:
        return
    m = cfg.nm[1]
    bad = [n for n, lin in layers if lin.in_features % m]
    if bad:
        raise UnsupportedError(f"pattern {cfg.pattern} needs input widths divisible by {m}; "
                               f"{len(bad)} layers are not ({', '.join(bad[:3])}); add them to ignore")


def account(model, pruned: dict[str, float], cfg: PruneOptions, extra: dict | None = None,
            zeros_per_layer: dict[str, int] | None = None) -> dict:
    """The step's report: what was pruned (per layer), the sparsity over those layers and over the
    whole model, and what was left dense. `zeros_per_layer` (counted while pruning) is what a
    streamed model can give: its weights are not in memory now, so the model's sparsity then counts
    the zeros of the pruned layers only."""
    from torch import nn

    from ..stream.skeleton import stream_of

    streamed = stream_of(model) is not None
    zeros = total = 0
    dense = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if name in pruned:
                zeros += zeros_per_layer[name] if streamed else int((mod.weight == 0).sum())
                total += mod.weight.numel()
            else:
                dense.append(name)
    params = sum(p.numel() for p in model.parameters())
    model_zeros = zeros if streamed else sum(int((p == 0).sum()) for p in model.parameters())
    out = {"layers": pruned, "pattern": cfg.pattern, "target_sparsity": cfg.target(),
           "sparsity": zeros / total if total else 0.0, "pruned_params": zeros,
           "model_sparsity": model_zeros / params if params else 0.0, "left_dense": dense, **(extra or {})}
    if streamed:
        out["model_sparsity_counts"] = "zeros of the pruned layers (streamed: other weights were not read)"
    return out


def prune_unseen(cfg: PruneOptions, per_layer: dict, zeros: dict, ctx, method: str):
    """The fallback for layers that saw no calibration token: magnitude pruning at the same sparsity or
    pattern (a calibrated score of zero everywhere would pick weights arbitrarily), with a note."""
    import torch

    from .calibrate import unseen_note
    from ..quant.sparsity import nm_mask, row_mask

    def fn(layers: dict) -> None:
        with torch.no_grad():
            for name, lin in layers.items():
                score = lin.weight.detach().abs().float()
                mask = nm_mask(score, *cfg.nm) if cfg.nm else row_mask(score, cfg.sparsity)
                lin.weight.masked_fill_(mask, 0)
                per_layer[name] = float(mask.float().mean())
                zeros[name] = int((lin.weight == 0).sum())
        ctx.notes.append(unseen_note(method, list(layers), "pruned by magnitude instead"))
    return fn
