"""AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent", intel/auto-round): block by
block, each Linear's rounding offset V ∈ [-0.5, 0.5] (one per weight) and each group's clipping of its min and max
(factors in [0, 1]) are tuned by signed gradient descent so the quantized block's output on the quantized model's
inputs matches the float model's block output on its own inputs (mean squared error), as auto-round does with
`enable_quanted_input` (its default): lr 1/iters decaying linearly to 0, the parameters of the iteration with the
least loss kept. Codes are then W/s + V rounded, stored in slimctl's packed int format (GGUF-exact with fp16 scales).
The scale of a symmetric group maps its larger extreme to −2^(b−1), as llama.cpp's Q4_0 and auto-round's `int` do."""
from __future__ import annotations

import random
import time
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ..quant.integer import QScheme, fp16_rounded
from ..stream.blocks import map_tensors
from .calibrate import run_block, sequential, summary
from .gptaq import FloatStream
from .registry import CalibrationOptions, StepContext, WeightOnlyOptions, plan_schemes, register


class AutoRoundConfig(WeightOnlyOptions, CalibrationOptions):
    iters: int = Field(default=200, ge=0, le=100_000)  # signed-gradient steps per block (auto-round: 200; "light": 50)
    lr: Optional[float] = Field(default=None, gt=0, le=1)  # default 1/iters, as auto-round
    minmax: bool = True  # also tune each group's clipping of its min and max (auto-round's enable_minmax_tuning)
    batch_size: int = Field(default=8, ge=1, le=4096)  # calibration texts per step
    # each block trained on the quantized blocks' outputs before it (auto-round's enable_quanted_input), its target
    # the float model's output; false: both on the float model's inputs
    quantized_inputs: bool = True
    # the block's forward and backward: bfloat16 autocast (auto-round's amp, its default) where the CPU has it natively
    train_dtype: Literal["float32", "bfloat16", "auto"] = "auto"


class _Rounding(nn.Module):
    """A Linear whose weight is fake-quantized with a tunable rounding offset and min/max clipping per group."""

    def __init__(self, lin: nn.Linear, scheme: QScheme, group: int, minmax: bool):
        super().__init__()
        self.lin, self.scheme, self.group = lin, scheme, group
        w = lin.weight.detach().float()
        self.w = w.reshape(-1, group)
        self.v = nn.Parameter(torch.zeros_like(self.w))
        shape = (self.w.shape[0], 1)
        self.min_scale = nn.Parameter(torch.ones(shape), requires_grad=minmax)
        self.max_scale = nn.Parameter(torch.ones(shape), requires_grad=minmax)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's scale and zero point (None: symmetric) from its clipped min and max."""
        s = self.scheme
        lo = self.w.amin(1, keepdim=True).clamp(max=0) * self.min_scale.clamp(0, 1)
        hi = self.w.amax(1, keepdim=True).clamp(min=0) * self.max_scale.clamp(0, 1)
        if s.symmetric:  # the larger extreme maps to qmin (−8 for int4): its sign picks the scale's
            scale = torch.where(-lo > hi, lo, hi) / s.qmin
            scale = torch.where(scale.abs() < 1e-9, torch.full_like(scale, 1e-9), scale)
            zero = None
        else:
            scale = ((hi - lo) / s.qmax).clamp(min=1e-9)
        if s.fp16_scales:
            scale = scale + (fp16_rounded(scale.detach()) - scale).detach()  # fp16 in the forward, straight through
        if not s.symmetric:
            zero = torch.round(-lo / scale).clamp(0, s.qmax).detach()
        return scale, zero

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        scale, zero = self.params()
        x = self.w / scale + self.v
        q = x + (torch.round(x) - x).detach()  # round with a straight-through gradient
        if zero is not None:
            q = q + zero
        return q.clamp(self.scheme.qmin, self.scheme.qmax), scale, zero

    def forward(self, x):
        q, scale, zero = self.codes()
        w = ((q - zero) * scale if zero is not None else q * scale).reshape(self.lin.weight.shape)
        return nn.functional.linear(x, w.to(x.dtype), self.lin.bias)


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(∂L/∂p) (auto-round's optimizer)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-g["lr"])


def _clamp(wraps: dict[str, _Rounding]) -> None:
    with torch.no_grad():
        for r in wraps.values():
            r.v.clamp_(-0.5, 0.5)
            r.min_scale.clamp_(0, 1)
            r.max_scale.clamp_(0, 1)


def _state(wraps: dict[str, _Rounding]) -> dict:
    return {n: (r.v.detach().clone(), r.min_scale.detach().clone(), r.max_scale.detach().clone()) for n, r in wraps.items()}


def _tune(block: nn.Module, wraps: dict[str, _Rounding], inputs: list, targets: list[torch.Tensor],
          cfg: AutoRoundConfig, seed: int, autocast) -> dict:
    """The signed-gradient loop of one block; leaves each wrapper at the parameters of its best iteration."""
    params = [p for r in wraps.values() for p in (r.v, r.min_scale, r.max_scale) if p.requires_grad]
    lr = cfg.lr or 1.0 / max(cfg.iters, 1)
    opt = SignSGD(params, lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=max(cfg.iters, 1))
    order = random.Random(seed)
    best, best_state, first, best_iter = float("inf"), _state(wraps), None, 0
    for it in range(cfg.iters):
        j = order.randrange(len(inputs))
        a, k = inputs[j]
        with autocast():
            out = run_block(block, a, k)
        loss = nn.functional.mse_loss(out.float(), targets[j])
        value = loss.item()
        first = value if first is None else first
        if value < best:
            best, best_state, best_iter = value, _state(wraps), it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _clamp(wraps)
    for n, (v, lo, hi) in best_state.items():
        with torch.no_grad():
            wraps[n].v.copy_(v)
            wraps[n].min_scale.copy_(lo)
            wraps[n].max_scale.copy_(hi)
    return {"loss_first": first, "loss_best": best if cfg.iters else None, "best_iter": best_iter}


def _trainable(inputs: list) -> list:
    """Copies of the captured block inputs that autograd may save (inference tensors may not be)."""
    with torch.inference_mode(False):
        return [map_tensors(x, lambda t: t.clone()) for x in inputs]


def _store(wraps: dict[str, _Rounding], model) -> None:
    """Each wrapper replaced by the packed Linear of its final codes and scales."""
    from ..quant.layers import WeightOnlyLinear
    from ..stream.skeleton import set_submodule

    for name, r in wraps.items():
        with torch.no_grad():
            q, scale, zero = r.codes()
        rows = r.lin.weight.shape[0]
        s = r.scheme
        set_submodule(model, name, WeightOnlyLinear.from_codes(
            r.lin, q.reshape(rows, -1), scale.reshape(rows, -1),
            zero.reshape(rows, -1) if zero is not None else None, s.bits, r.group, s.scale_dtype))


def _frozen(block: nn.Module) -> dict:
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    return flags


def autoround_layers(model, targets: dict, schemes: dict[str, QScheme], groups: dict[str, int], cfg: AutoRoundConfig,
                     ctx: StepContext) -> dict:
    """AutoRound on the `targets` inside the repeated blocks, block by block; returns the per-block record."""
    from ..stream.skeleton import refuse, stream_of
    from .distill import _autocast
    from . import placement
    from .precision import resolve

    if stream_of(model):
        refuse("autoround (the float model's block inputs travel beside the quantized ones)")
    batches = cfg.batches(ctx)
    twin, record = FloatStream(), {}
    autocast = _autocast(resolve(cfg.train_dtype), torch.device(placement.device_type()))

    def on_block(i, prefix, block, inputs):
        mine = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
        float_inputs, outs = twin.step(block, inputs)
        if not mine:
            return
        t0 = time.perf_counter()
        with torch.inference_mode(False):  # the targets as tensors autograd may use
            want = [o.float().clone() for o in outs]
        flags = _frozen(block)
        wraps = {n: _Rounding(m, schemes[n], groups[n], cfg.minmax) for n, m in mine.items()}
        for n, r in wraps.items():
            block.set_submodule(n[len(prefix) + 1:], r)
        own = _trainable(inputs if cfg.quantized_inputs else float_inputs)
        with torch.enable_grad():
            record[prefix] = _tune(block, wraps, own, want, cfg, ctx.seed + i, autocast)
        _store(wraps, model)
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        record[prefix]["seconds"] = round(time.perf_counter() - t0, 2)

    seq = cfg.calib_seq_len or 256
    sequential(model, batches, on_block, ctx.track, batch_tokens=cfg.batch_size * seq)
    left = [n for n in targets if not any(n.startswith(p + ".") for p in record)]
    return {"calibration": summary(batches), "blocks": record, "left": left}


@register("autoround", "quantize", AutoRoundConfig,
          "AutoRound (SignRound): rounding and clipping tuned by signed gradient descent per block; packed int, reloads with slimctl",
          loads_with="slimctl")
def apply(model, cfg: AutoRoundConfig, ctx: StepContext) -> dict:
    from ..quant.layers import bits_per_weight

    targets, groups, schemes = plan_schemes(model, cfg, ctx)
    out = autoround_layers(model, targets, schemes, groups, cfg, ctx)
    from .rtn import round_outside_blocks

    round_outside_blocks(model, out["left"], targets, schemes, ctx)
    return {"layers": list(targets), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
            "iters": cfg.iters, "bits_per_weight": bits_per_weight(model, list(targets)), **out}
