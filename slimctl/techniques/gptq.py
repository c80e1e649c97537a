"""GPTQ (Frantar et al. 2022): weight-only int4/int8 that corrects each column's rounding error
with the inverse Hessian of the layer's calibration inputs, one block of the model at a time."""
from __future__ import annotations

import torch
from pydantic import Field

from ..calibrate import (calibrated, hessian_start, inverse_hessian_factor, raised_dampening, relative_output_error,
                         summary)
from ..qmodules import WeightOnlyLinear, set_submodule
from ..quant import QScheme, dequantize_groups, dequantize_with, group_params, quantize_with
from . import CalibrationOptions, StepContext, WeightOnlyOptions, plan_schemes, register


class GPTQConfig(WeightOnlyOptions, CalibrationOptions):
    dampening: float = Field(default=0.01, gt=0, le=1)  # fraction of mean(diag H) added to the diagonal
    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    block_size: int = Field(default=128, ge=8, le=4096)  # columns per lazy-update block


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: QScheme, group: int, dampening: float,
                  act_order: bool, block_size: int, layer: str = "a layer", damping: dict[str, float] | None = None):
    """Integer codes [out, in], scales and zeros [out, in/group] for W given H = 2/n Σ x xᵀ."""
    w, h = hessian_start(w, h)
    out_f, in_f = w.shape
    ngroups = in_f // group
    scale = torch.zeros(out_f, ngroups)
    zero = None if scheme.symmetric else torch.zeros(out_f, ngroups)
    static = act_order or group >= in_f
    if static:  # group parameters from the original weights (needed once columns are permuted)
        for g in range(ngroups):
            s, z = group_params(w[:, g * group:(g + 1) * group], scheme)
            scale[:, g] = s
            if zero is not None:
                zero[:, g] = z
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, dampening, layer, damping)
    block = max(block_size, group) if group < in_f else block_size
    q = torch.zeros_like(w)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, q1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), torch.zeros(out_f, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = (int(perm[col]) if perm is not None else col) // group
            if not static and col % group == 0:  # group params from the already-updated weights
                s, z = group_params(w1[:, i:i + group], scheme)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            s, z = scale[:, g], (zero[:, g] if zero is not None else None)
            col_w = w1[:, i:i + 1]
            cq = quantize_with(col_w, s, z, scheme)
            q1[:, i] = cq[:, 0]
            e = (col_w[:, 0] - dequantize_with(cq, s, z)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i:i + 1, i:]
            err1[:, i] = e
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, scale, zero


@register("gptq", "quantize", GPTQConfig,
          "GPTQ weight-only int4/int8 with calibration, block by block; packed, reloads with slimctl",
          loads_with="slimctl", streams=True)
def apply(model, cfg: GPTQConfig, ctx: StepContext) -> dict:
    targets, groups, schemes = plan_schemes(model, cfg, ctx)
    out = gptq_layers(model, targets, schemes, cfg, ctx)
    return {"layers": list(targets), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
            "act_order": cfg.act_order, **out}


def gptq_layers(model, targets: dict, schemes: dict[str, QScheme], cfg: GPTQConfig, ctx: StepContext) -> dict:
    """GPTQ on `targets`, each with its own scheme (bits, group); layers outside the repeated blocks
    are rounded to nearest. Returns the calibration record, errors and raised dampening."""
    from ..qmodules import bits_per_weight

    batches = cfg.batches(ctx)
    errors: dict[str, float] = {}
    damping: dict[str, float] = {}

    def quantize(mine: dict, stats) -> None:
        for name, lin in mine.items():
            sch = schemes[name]
            w = lin.weight.detach().float()
            codes, scale, zero = gptq_quantize(w, stats.hessian[name], sch, sch.group_size, cfg.dampening,
                                               cfg.act_order, cfg.block_size, name, damping)
            errors[name] = relative_output_error(w, dequantize_groups(codes, scale, zero, sch.group_size), stats.hessian.pop(name))
            set_submodule(model, name, WeightOnlyLinear.from_codes(lin, codes, scale, zero, sch.bits, sch.group_size,
                                                                      sch.scale_dtype))

    def blind(layers: dict) -> None:
        from ..calibrate import unseen_note
        from .rtn import round_layers

        round_layers(model, layers, schemes)
        ctx.notes.append(unseen_note("gptq", list(layers), "rounded to nearest (RTN) instead"))

    missed = calibrated(model, targets, batches, quantize, hessian=True, track=ctx.track, leftover="return",
                        unseen=blind)
    if missed:  # layers outside the repeated blocks get round-to-nearest
        from .rtn import round_layers

        round_layers(model, {n: targets[n] for n in missed}, schemes)
        ctx.notes.append(f"{len(missed)} layers outside the repeated blocks were quantized with RTN: {', '.join(missed[:3])}")
    return {"calibration": summary(batches), "relative_output_error": errors,
            "bits_per_weight": bits_per_weight(model, list(targets)), **raised_dampening(damping, cfg.dampening, ctx)}
