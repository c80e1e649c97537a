"""GPTAQ's asymmetric calibration (Li et al., ICML 2025, "GPTQv2: Efficient Finetuning-Free Quantization with
Asymmetric Calibration", since renamed GPTAQ): GPTQ fits each layer's output on the quantized model's own inputs X̃
to the same layer's output in that model, W X̃; GPTAQ fits it to the float model's output on the float model's
inputs, min ‖Ŵ X̃ − W X‖², so the rounding of earlier blocks is corrected too. The solution is GPTQ's column loop
with one more term per column (`correction`), from the cross term C = (2/n) ΔXᵀ X̃ (ΔX = X − X̃) beside GPTQ's H =
(2/n) X̃ᵀ X̃. This module carries the float model's block inputs beside the quantized ones and gathers C per layer.
(The closed form W + W C H⁻¹, the unconstrained least-squares fit, was tried first: it fits the calibration text's
noise, ‖ΔW‖/‖W‖ reached 1.6 in late blocks of smollm2-135m and BBC perplexity x16.7; the published update is
strictly sequential and damped.)"""
from __future__ import annotations

import torch
from torch import nn

from ..stream.blocks import with_hidden
from .calibrate import run_block


class FloatStream:
    """The float model's inputs to the block being calibrated, one per calibration batch (the quantized stream's
    twin). Block 0 reads the same embeddings on both sides, so it starts as a copy of the first block's inputs."""

    def __init__(self):
        self.inputs: list | None = None

    def cross(self, block: nn.Module, inputs, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """(2/n) Σ (x − x̃)ᵀ x̃ per layer of `block` (x: its input in the float model, x̃: in the quantized one, over
        the same tokens), then the float stream moved on through the block, which must still be float. A layer
        whose calls do not pair up (a routed expert sees other tokens on each side) gets none: plain GPTQ."""
        if self.inputs is None:
            self.inputs = list(inputs)
        acc = {k: torch.zeros(m.in_features, m.in_features) for k, m in layers.items()}
        n, bad = dict.fromkeys(layers, 0), set()
        seen: dict[str, list[torch.Tensor]] = {}
        mode = ["float"]
        shared: dict = {}  # layers reading the same input on both sides (q/k/v, gate/up) share one product

        def hook(name):
            def fn(mod, args, out):
                raw = args[0].detach()
                if mode[0] == "float":
                    seen.setdefault(name, []).append(raw)
                    return
                mine = seen.get(name) or []
                xf = mine.pop(0) if mine else None
                if xf is None or xf.shape != raw.shape:
                    bad.add(name)
                    return
                key = (xf.data_ptr(), raw.data_ptr(), raw.shape)
                if key not in shared:  # the tensors are kept with it, so neither address is reused meanwhile
                    x = raw.reshape(-1, raw.shape[-1]).float()
                    shared[key] = (xf, raw, (xf.reshape(x.shape).float() - x).T @ x)
                prod, m = shared[key][2], raw.numel() // raw.shape[-1]
                acc[name].mul_(n[name] / (n[name] + m)).add_(prod, alpha=2.0 / (n[name] + m))
                n[name] += m
            return fn

        hooks = [m.register_forward_hook(hook(k)) for k, m in layers.items()]
        try:
            with torch.inference_mode():
                for j, (a, k) in enumerate(inputs):
                    fa, fk = self.inputs[j]
                    mode[0], seen = "float", {}  # the hooks read `seen` from this scope: a fresh record per batch
                    shared.clear()
                    out = run_block(block, fa, fk)
                    mode[0] = "quantized"
                    run_block(block, a, k)
                    bad.update(name for name, left in seen.items() if left)
                    self.inputs[j] = with_hidden(fa, fk, out)
        finally:
            for h in hooks:
                h.remove()
        return {k: v for k, v in acc.items() if k not in bad and n[k]}

    def step(self, block: nn.Module, inputs) -> tuple[list, list[torch.Tensor]]:
        """(this block's inputs in the float model, its outputs on them), the stream moved on through the block,
        which must still be float (AutoRound's targets)."""
        if self.inputs is None:
            self.inputs = list(inputs)
        before = self.inputs
        with torch.inference_mode():
            outs = [run_block(block, a, k) for a, k in before]
        self.inputs = [with_hidden(a, k, o) for (a, k), o in zip(before, outs)]
        return before, outs

    def advance(self, block: nn.Module) -> None:
        """The float stream through a block with no layer to calibrate."""
        if self.inputs is not None:
            self.step(block, self.inputs)


def correction(cross: torch.Tensor, hinv: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's P = α · triu₁(C Uᵀ) · U (U: the upper Cholesky factor of (H + λI)⁻¹ that GPTQ's loop uses, C the
    cross term in the same column order): when column i is quantized, its pre-rounding weights times P[i, i+1:] are
    added to the columns after it, as its rounding error times U[i, i:] is taken off them. Strictly upper: a column
    only corrects the columns not yet quantized. α (the reference implementation's 0.25) damps the correction,
    which the calibration text estimates noisily."""
    return alpha * torch.triu(cross @ hinv.T, diagonal=1) @ hinv
