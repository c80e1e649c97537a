"""The cost of quantizing each Linear estimated from one forward and a few backward passes (Fisher
information), instead of one forward per Linear and format: the KL divergence a weight change ΔW causes
is, to second order, ½ E_y[(gᵀ ΔW x)²], where x is the Linear's input at a token, g the gradient of
log p(y) with respect to the Linear's output, and y a label drawn from the model's own next-token
distribution (so that E_y[g gᵀ] is the Fisher information pulled back to that output). Each token's
perturbation is scored on its own (the cross-token terms of attention are left out), so the estimate
has the measured cost's units: KL summed over the vocabulary, mean over tokens.

`mixed` uses it for causal LMs (`sensitivity: fisher`, the default); the measured costs stay available
(`sensitivity: measured`) and scripts/bench_cost.py compares the two on the same layers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..results import stages
from ..quant.integer import dequantize_groups, rtn


def fisher_costs(model, targets: dict[str, nn.Linear], choices: dict[str, dict], groups: dict[str, dict[str, int]],
                 batches: list[dict], seed: int, draws: int = 4,
                 track: Callable = lambda it, desc, total: it) -> dict[str, dict[str, float]]:
    """Estimated KL of each quantized choice of each Linear (round to nearest, as the measured costs use),
    from `draws` labels drawn per token on the calibration texts. The backward passes run one block at a
    time (blockwise.py), so a streamed model gets the same estimate as the model in memory."""
    from .blockwise import backward_by_block
    from .calibrate import BATCH_TOKENS, stack

    totals = {n: {c: 0.0 for c in choices[n]} for n in targets}
    tokens = [0]
    gen = torch.Generator().manual_seed(seed)

    def seeds(_, logits: torch.Tensor):
        probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1])
        tokens[0] += probs.shape[0]
        for _ in range(draws):
            labels = torch.multinomial(probs, 1, generator=gen)
            grad = -probs
            grad.scatter_add_(1, labels, torch.ones_like(labels, dtype=grad.dtype))  # e_y - p = ∇ log p(y)
            yield grad.view_as(logits)

    with _Hooks(targets, choices, groups, totals):
        backward_by_block(model, stack(batches, BATCH_TOKENS), seeds, stages.SENSITIVITY, track, desc="sensitivity (Fisher)")
    return {n: {c: (v / (draws * max(tokens[0], 1)) if choices[n][c].scheme is not None else 0.0) for c, v in cs.items()}
            for n, cs in totals.items()}


class _Hooks:
    """A forward hook on each Linear hooks its output's gradient, which adds ½ (gᵀ ΔW x)² per token of that
    call's input x for every choice's ΔW. ΔW is computed from the float weight when a Linear's gradient first
    arrives and kept for its next draws (blockwise.py runs a block's draws one after another), the most recent
    up to CACHE_BYTES."""

    CACHE_BYTES = 256 << 20

    def __init__(self, targets, choices, groups, totals):
        from collections import OrderedDict

        self.targets, self.choices, self.groups, self.totals = targets, choices, groups, totals
        self.deltas: OrderedDict = OrderedDict()  # (layer, choice) -> ΔW, least recently used first
        self.cached = 0

    def __enter__(self):
        self.handles = [lin.register_forward_hook(self._forward(n)) for n, lin in self.targets.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    PRODUCT_BYTES = 64 << 20  # a call's ΔW x products kept for its next draws when they fit in this

    def _forward(self, name: str):
        def fn(mod, args, out):
            if out.requires_grad:
                x = args[0].detach()
                products: dict = {}  # choice -> x ΔWᵀ for this call: the same for every draw (only g changes)
                out.register_hook(lambda g: self._score(name, x, g, products))
        return fn

    def _score(self, name: str, x: torch.Tensor, g: torch.Tensor, products: dict) -> None:
        w = self.targets[name].weight.detach().float()
        g = g.float().reshape(-1, g.shape[-1])
        x = x.float().reshape(-1, x.shape[-1])
        live = [c for c, ch in self.choices[name].items() if ch.scheme is not None]
        keep = 4 * x.shape[0] * w.shape[0] * len(live) <= self.PRODUCT_BYTES
        todo = [c for c in live if c not in products]
        with stages.stage(stages.SENSITIVITY, 2.0 * x.shape[0] * w.numel() * len(todo) + 3.0 * g.numel() * len(live)):
            for cname in live:
                xd = products.get(cname)
                if xd is None:
                    xd = x @ self._delta(name, cname, w).T
                    if keep:
                        products[cname] = xd
                proj = (g * xd).sum(-1)
                self.totals[name][cname] += 0.5 * float(proj.pow(2).sum())

    def _delta(self, name: str, cname: str, w: torch.Tensor) -> torch.Tensor:
        """W minus its round-to-nearest copy in the choice's format (the same tensor every draw)."""
        key = (name, cname)
        if key in self.deltas:
            self.deltas.move_to_end(key)
            return self.deltas[key]
        grp = self.groups[name][cname]
        dw = w - dequantize_groups(*rtn(w, self.choices[name][cname].scheme, grp), grp)
        self.deltas[key] = dw
        self.cached += dw.numel() * dw.element_size()
        while self.cached > self.CACHE_BYTES and len(self.deltas) > 1:
            _, old = self.deltas.popitem(last=False)
            self.cached -= old.numel() * old.element_size()
        return dw
