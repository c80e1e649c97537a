"""Per-Linear sensitivity and bit allocation: the measured cost of quantizing one Linear at a time
(KL divergence of the model's next-token distribution, or the relative error of its last hidden
state for encoders), and the choice of a format per Linear that minimises the summed cost under an
average bits-per-weight budget (scales and zero points counted)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError
from ..quant.integer import QScheme, dequantize_groups, rtn


@dataclass(frozen=True)
class Choice:
    """One storage format a Linear may get: `scheme` None keeps it in float."""

    name: str  # "int4-g128", "int8", "float"
    scheme: QScheme | None

    def bits(self, lin: nn.Linear, group: int | None) -> int:
        """Bits this format stores for the layer's weight, as qmodules.storage_bits counts them."""
        out_f, in_f = lin.out_features, lin.in_features
        if self.scheme is None:
            return out_f * in_f * lin.weight.element_size() * 8
        per_group = (16 if self.scheme.fp16_scales else 32) + (0 if self.scheme.symmetric else 8)  # scale (+ uint8 zero)
        return out_f * in_f * self.scheme.bits + out_f * (in_f // group) * per_group


def _output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    return out[0] if isinstance(out, (tuple, list)) else out


class _Replay:
    """The float model's block outputs per calibration batch, replayed so that a forward pass with one
    Linear changed starts at that Linear's block: the blocks before it return what they returned."""

    def __init__(self, model, batches: list[dict]):
        from ..stream.blocks import find_blocks

        self.prefix, self.blocks = find_blocks(model)
        self.outs: list[list] = [[] for _ in self.blocks]
        hooks = [b.register_forward_hook(self._keep(j)) for j, b in enumerate(self.blocks)]
        try:
            with torch.inference_mode():
                self.ref = [_output(model(**b)).float() for b in batches]
        finally:
            for h in hooks:
                h.remove()

    def _keep(self, j):
        def fn(mod, args, out):
            self.outs[j].append(out)
        return fn

    def first_block(self, name: str) -> int:
        """Index of the block holding the Linear `name` (0 when it is outside the blocks)."""
        head = name[len(self.prefix) + 1:].split(".", 1)[0] if name.startswith(self.prefix + ".") else ""
        return int(head) if head.isdigit() else 0

    def forward(self, model, batch: dict, index: int, start: int):
        for j in range(start):  # an instance attribute shadows the class's forward
            self.blocks[j].forward = lambda *a, _o=self.outs[j][index], **k: _o
        try:
            return _output(model(**batch)).float()
        finally:
            for j in range(start):
                del self.blocks[j].forward


def _cost(model, batches, replay: _Replay, start: int, logits: bool) -> float:
    from ..results import stages

    tokens = sum(b["input_ids"].numel() for b in batches)
    flops = sum(stages.linear_flops(b, tokens) for b in replay.blocks[start:])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    flops += stages.linear_flops(head, tokens) if head is not None and getattr(head, "weight", None) is not None else 0.0
    with stages.stage(stages.SENSITIVITY, flops):
        return _measured_cost(model, batches, replay, start, logits)


def _measured_cost(model, batches, replay: _Replay, start: int, logits: bool) -> float:
    total, n = 0.0, 0
    with torch.inference_mode():
        for i, (b, r) in enumerate(zip(batches, replay.ref)):
            y = replay.forward(model, b, i, start)
            if logits:  # KL(reference || quantized), summed over the vocabulary, mean over tokens
                lr, lp = r.log_softmax(-1), y.log_softmax(-1)
                total += max(float((lr.exp() * (lr - lp)).sum()), 0.0)  # ≥ 0 but for rounding
                n += r[..., 0].numel()
            else:  # relative squared error of the hidden states
                total += float((y - r).pow(2).sum() / r.pow(2).sum().clamp(min=1e-12))
                n += 1
    return total / max(n, 1)


def layer_costs(model, targets: dict[str, nn.Linear], choices: dict[str, dict[str, Choice]],
                groups: dict[str, dict[str, int]], batches: list[dict], logits: bool,
                track=lambda it, desc, total: it) -> dict[str, dict[str, float]]:
    """Cost of each quantized choice of each Linear, quantized alone (round to nearest), the rest float.
    Each pass starts at the Linear's own block (earlier blocks replay their float outputs)."""
    replay = _Replay(model, batches)
    costs: dict[str, dict[str, float]] = {}
    for name in track(list(targets), "sensitivity", len(targets)):
        lin = targets[name]
        w0 = lin.weight.detach().clone()
        costs[name] = {}
        try:
            for cname, ch in choices[name].items():
                if ch.scheme is None:
                    costs[name][cname] = 0.0
                    continue
                g = groups[name][cname]
                with torch.no_grad():
                    lin.weight.copy_(dequantize_groups(*rtn(w0.float(), ch.scheme, g), g).to(w0.dtype))
                costs[name][cname] = _cost(model, batches, replay, replay.first_block(name), logits)
        finally:
            with torch.no_grad():
                lin.weight.copy_(w0)
    return costs


def check_budget(bits: dict[str, dict[str, int]], weights: dict[str, int], avg_bits: float) -> None:
    """A RecipeError when even the fewest bits of every layer exceed the budget."""
    least = sum(min(b.values()) for b in bits.values()) / max(sum(weights.values()), 1)
    if least > avg_bits:
        raise RecipeError(f"avg_bits {avg_bits:g} is below the smallest possible {least:.3f} bits per weight for "
                          "these layers and choices (int4 codes plus a float32 scale per group); raise it or the group size")


def allocate(bits: dict[str, dict[str, int]], costs: dict[str, dict[str, float]], weights: dict[str, int],
             avg_bits: float) -> dict[str, str]:
    """A choice per layer minimising Σ cost with Σ bits ≤ avg_bits × Σ weights (never above).

    Greedy on the multiple-choice knapsack: start every layer at its fewest bits, then repeatedly take
    the upgrade with the largest cost saved per extra bit that still fits the budget."""
    check_budget(bits, weights, avg_bits)
    budget = avg_bits * sum(weights.values())
    pick = {n: min(bits[n], key=lambda c: (bits[n][c], costs[n][c])) for n in bits}
    used = sum(bits[n][pick[n]] for n in pick)
    while True:
        best = None
        for n, cur in pick.items():
            for c, b in bits[n].items():
                extra, saved = b - bits[n][cur], costs[n][cur] - costs[n][c]
                if extra > 0 and saved > 0 and used + extra <= budget:
                    gain = saved / extra
                    if best is None or gain > best[0]:
                        best = (gain, n, c, extra)
        if best is None:
            return pick
        _, n, c, extra = best
        pick[n], used = c, used + extra
