"""Scales folded exactly between a producer (a norm, or a Linear's output rows) and the Linears that read
it, resolved per block from the family registry: AWQ and SmoothQuant choose s, this file applies it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import head_counts, model_type, of, part_rows, text_config


@dataclass(frozen=True)
class BlockFold:
    """A Fold resolved on one block: the rows of prev it scales, and how its channels map to the Linears'
    input columns (grouped-query attention: each kv channel feeds `repeat` query heads' columns)."""

    prev: str
    how: str  # "norm" | "rows"
    linears: tuple[str, ...]
    inspect: str
    rows: slice | None = None  # prev's output rows (a fused producer's part); None: all
    offset: float = 0.0  # norm weight convention x̂ · (offset + w)
    repeat: int = 1
    head_dim: int = 0


def _exists(block, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def block_folds(model, block) -> tuple[list[BlockFold], list[str]]:
    """The exact folds of one block from its family file, and the groups left without one (with why).
    A model whose family is not registered gets none, and says so."""
    fam = of(model)
    if fam is None:
        return [], [f"{type(block).__name__} (model type '{model_type(model)}' has no family file: no folds)"]
    config = text_config(model.config)
    out, skipped = [], list(fam.no_fold)
    for f in fam.folds(block, config):
        missing = [p for p in (f.prev, *f.linears) if p and not _exists(block, p)]
        if missing:
            skipped.append(f"{f.prev} -> {', '.join(f.linears)} ({missing[0]} not found)")
            continue
        prev = block.get_submodule(f.prev)
        if f.how == "norm" and not isinstance(getattr(prev, "weight", None), nn.Parameter):
            skipped.append(f"{f.prev} -> {', '.join(f.linears)} ({f.prev} has no scale to fold into)")
            continue
        rows = part_rows(fam, f.prev, f.part, prev.weight.shape[0], config) if f.part else None
        repeat, head_dim = 1, 0
        if f.heads:
            heads, kv, hd = head_counts(config)
            produced = (rows.stop - rows.start) if rows else prev.weight.shape[0]
            consumer = block.get_submodule(f.linears[0]).weight.shape[1]
            if produced * (heads // kv) != consumer:
                skipped.append(f"{f.prev} -> {f.linears[0]} (head layout {produced} x {heads // kv} != {consumer})")
                continue
            repeat, head_dim = heads // kv, produced // kv
        out.append(BlockFold(f.prev, f.how, f.linears, f.inspect, rows, fam.norm_offset if f.how == "norm" else 0.0,
                             repeat, head_dim))
    return out, skipped


def expand(s: torch.Tensor, fold: BlockFold) -> torch.Tensor:
    """Scale per prev channel -> per Linear input column (GQA: each kv head feeds `repeat` heads)."""
    if fold.repeat == 1:
        return s
    kv = s.numel() // fold.head_dim
    return s.view(kv, 1, fold.head_dim).expand(kv, fold.repeat, fold.head_dim).reshape(-1)


def reduce(v: torch.Tensor, fold: BlockFold, how: str = "mean") -> torch.Tensor:
    """Per Linear input column -> per prev channel (mean or max over the heads sharing a kv head)."""
    if fold.repeat == 1:
        return v
    kv = v.numel() // (fold.head_dim * fold.repeat)
    grouped = v.view(kv, fold.repeat, fold.head_dim)
    return (grouped.amax(1) if how == "max" else grouped.mean(1)).reshape(-1)


def fold_scale(block: nn.Module, fold: BlockFold, s: torch.Tensor, inverse: bool = False) -> None:
    """prev's output ÷ s (a norm: (offset + w) / s - offset and bias / s; a Linear: its rows and bias), the
    readers' input columns × s. inverse=True undoes it."""
    s = 1 / s if inverse else s
    prev = block.get_submodule(fold.prev)
    with torch.no_grad():
        if fold.how == "norm":
            w = prev.weight
            w.copy_(((fold.offset + w.float()) / s - fold.offset).to(w.dtype))
        else:
            r = fold.rows or slice(None)
            prev.weight[r] /= s[:, None].to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias[fold.rows or slice(None)] /= s.to(prev.bias.dtype)
        cols = expand(s, fold)[None, :]
        for n in fold.linears:
            w = block.get_submodule(n).weight
            w.mul_(cols.to(w.dtype))
