"""Global width allocation for structured pruning: the Fisher of the next-token loss at each block's output (from
backward passes one block at a time), each layer's greedy OBS removal path weighted by it, and the cheapest channels
model-wide under one budget, each layer's removals in its own order."""
from __future__ import annotations

import torch
from torch import nn

from ..results import stages
from ..stream.blocks import find_blocks
from .calibrate import block_stats, sequential
from .reconstruct import remove_groups


def output_fisher(model, batches: list[dict], track=lambda it, desc, total: it) -> list[torch.Tensor]:
    """Per block: the diagonal empirical Fisher of the next-token loss w.r.t. the block's output (mean g²
    per hidden feature over calibration tokens). An FFN or o_proj adds to that residual stream, so
    Σ_o F_o ‖ΔW_o X‖² estimates the loss a change of those Linears costs (K-FAC style). The backward
    passes run one block at a time (blockwise.py), in memory or streamed alike."""
    from .blockwise import backward_by_block

    _, blocks = find_blocks(model)
    fisher = [torch.zeros(0)] * len(blocks)

    def seeds(p: int, logits: torch.Tensor):  # ∂/∂logits of Σ_t CE(logits_t, ids_t+1): softmax − one-hot, 0 at the end
        ids = batches[p]["input_ids"]
        grad = logits.detach().softmax(-1)
        grad[:, -1] = 0
        grad[:, :-1].scatter_add_(-1, ids[:, 1:, None], torch.full(ids[:, 1:, None].shape, -1.0))
        yield grad

    def add(i: int, p: int, g: torch.Tensor) -> None:
        g = g.detach().float().reshape(-1, g.shape[-1])
        fisher[i] = fisher[i] + (g * g).sum(0) if fisher[i].numel() else (g * g).sum(0)

    backward_by_block(model, batches, seeds, stages.FORWARD, track, on_output=add, desc="output Fisher")
    tokens = sum(b["input_ids"].numel() for b in batches)
    return [f / max(tokens, 1) for f in fisher]


def global_widths(model, batches, consumers: list[nn.Linear], budget: int, fisher: list, caps: list[int],
                  dampening: float, multiple: int, track=lambda it, desc, total: it) -> list[int]:
    """Per-layer FFN widths under one budget (`budget` channels removed in all): a pass that records each layer's
    greedy OBS path (reconstruct.remove_groups, at most `caps[i]` channels) with its error weighted by the Fisher of
    the loss w.r.t. the block output (an estimate of the loss each removal costs), then the cheapest channels
    model-wide, in each layer's order; widths rounded to `multiple`. Layers may start at different widths."""
    widths = [c.in_features for c in consumers]
    paths = []

    def on_block(i, name, block, inputs):
        lin = consumers[i]
        stats = block_stats(block, inputs, {"ffn": lin}, hessian=True)
        r = remove_groups(lin.weight, stats.hessian["ffn"], torch.arange(widths[i])[:, None], caps[i], dampening,
                          lin.bias, stats.sum["ffn"] / max(stats.n["ffn"], 1), fisher[i])
        paths.append(r.path)

    sequential(model, batches, on_block, track)
    removed = allocate(paths, budget)
    return [round_width(w - r, w, multiple) for w, r in zip(widths, removed)]


def allocate(paths: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """Channels removed per layer: the cheapest marginal costs model-wide (each layer's marginal costs made
    non-decreasing along its path, so a layer's removals are taken in its own order) until `budget`."""
    segs = []
    for layer, path in enumerate(paths):
        prev_k, prev_e, worst = 0, 0.0, 0.0
        for k, e in path:
            worst = max(worst, (e - prev_e) / max(k - prev_k, 1))
            segs.append((worst, layer, k - prev_k))
            prev_k, prev_e = k, e
    out = [0] * len(paths)
    for _, layer, n in sorted(segs):
        take = min(n, budget)
        out[layer] += take
        budget -= take
        if budget <= 0:
            break
    return out


def round_width(keep: int, width: int, multiple: int) -> int:
    return min(width, max(multiple, int(round(keep / multiple)) * multiple))
