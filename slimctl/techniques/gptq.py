"""GPTQ (Frantar et al. 2022): weight-only int4/int8 that corrects each column's rounding error
with the inverse Hessian of the layer's calibration inputs, one block of the model at a time."""
from __future__ import annotations

import torch
from pydantic import Field

from ..results import stages

from .calibrate import calibrated, raised_dampening, summary
from .gptaq import correction
from .hessian import hessian_start, inverse_hessian_factor, relative_output_error
from ..kinds import CAUSAL_LM
from ..quant.layers import WeightOnlyLinear
from ..stream.skeleton import set_submodule
from ..quant.integer import QScheme, dequantize_groups, group_params
from .registry import CalibrationOptions, Proposal, StepContext, WeightOnlyOptions, plan_schemes, register


class GPTQConfig(WeightOnlyOptions, CalibrationOptions):
    dampening: float = Field(default=0.01, gt=0, le=1)  # fraction of mean(diag H) added to the diagonal
    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    block_size: int = Field(default=128, ge=8, le=4096)  # columns per lazy-update block
    # GPTAQ (asymmetric calibration): fit each layer's output on the quantized model's inputs to the float model's
    # output on its own inputs, so earlier blocks' rounding is corrected too (gptaq.py); one more block forward per text
    gptaq: bool = False
    gptaq_alpha: float = Field(default=0.25, gt=0, le=1)  # GPTAQ's damping of its correction (the reference's 0.25)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: QScheme, group: int, dampening: float,
                  act_order: bool, block_size: int, layer: str = "a layer", damping: dict[str, float] | None = None,
                  record: dict | None = None, cross: torch.Tensor | None = None, alpha: float = 0.25):
    """Integer codes [out, in], scales and zeros [out, in/group] for W given H = 2/n Σ x xᵀ. `record`, when
    given, gets GPTQ's own measure of each row's error, row_loss = Σⱼ eⱼ² = ΔW (H + λI) ΔWᵀ (ΔW = W − Ŵ with
    never-seen inputs' weights zeroed; exact in exact arithmetic, as U (H + λI) Uᵀ = I), and the absolute λ.
    `cross`: GPTAQ's C (gptaq.py), whose correction joins the column loop."""
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
    if cross is not None:
        cross = cross.clone()
        cross[:, torch.diag(h) == 0] = 0
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        cross = cross[perm][:, perm] if cross is not None else None
    damping = {} if damping is None else damping
    hinv = inverse_hessian_factor(h, dampening, layer, damping)
    p = correction(cross, hinv, alpha) if cross is not None else None
    block = max(block_size, group) if group < in_f else block_size
    with stages.stage(stages.SOLVE, 2.0 * out_f * in_f * (in_f + block)):
        q, row_loss = _columns(w, hinv, scale, zero, scheme, group, block, perm, static, p)
    if record is not None:
        record.update(row_loss=row_loss, lam=damping[layer] * float(torch.mean(torch.diag(h))))
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, scale, zero


def output_error(w, w_hat, h, record: dict, rows: slice, energy: float | None) -> float:
    """‖(W − Ŵ) X‖² / ‖W X‖² over the calibration inputs from what GPTQ and the statistics already hold: the
    numerator is GPTQ's row loss less λ‖ΔW‖² (the dampening's share), the denominator the layer's output energy
    counted during the calibration forward. Equal to relative_output_error's trace form within float rounding
    (test), without its two products of W by H (a quarter of a 70B-shaped layer's time). Without an energy (the
    statistics did not count one) the trace form is used."""
    if energy is None:
        return relative_output_error(w, w_hat, h)
    with stages.stage(stages.ERROR, 3.0 * w.numel()):
        d = w - w_hat
        d[:, torch.diag(h) == 0] = 0  # never-seen inputs: no output error, and GPTQ quantized them as zeros
        num = float(record["row_loss"][rows].sum()) - record["lam"] * float((d * d).sum())
    return max(num, 0.0) / max(energy, 1e-12)


SUB_BLOCK = 16  # columns whose errors are spread one by one; a matmul spreads them over the rest of the block


def _columns(w, hinv, scale, zero, scheme: QScheme, group: int, block: int, perm, static: bool, p=None):
    """GPTQ's lazy-batched column loop: quantize each column and spread its error over the columns after it,
    in two levels of lazy batching (one by one within a sub-block of 16 columns, one matmul per sub-block over
    the rest of the block, one per block beyond it: the same sums in another order). Fills scale/zero when they
    are not static. The arithmetic per column is quantize_with/dequantize_with's, written out to spare a dozen
    small tensor operations per column (the loop runs once per input column of every layer). Returns the codes
    and each row's Σ of squared scaled errors (GPTQ's loss). `p`: GPTAQ's correction (gptaq.correction): each
    column's pre-rounding weights times its row of p are added to the columns after it, in the same lazy batches."""
    out_f, in_f = w.shape
    q, loss = torch.zeros_like(w), torch.zeros(out_f)
    order = perm.tolist() if perm is not None else None
    lo, hi = float(scheme.qmin), float(scheme.qmax)
    sub = SUB_BLOCK if static or group % SUB_BLOCK == 0 else group  # a group starts on a sub-block
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, q1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), torch.zeros(out_f, i2 - i1), hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1).tolist()
        pre1, p1 = (torch.zeros(out_f, i2 - i1), p[i1:i2, i1:i2]) if p is not None else (None, None)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                g = (order[col] if order is not None else col) // group
                if not static and col % group == 0:  # group params from the already-updated weights
                    sg, zg = group_params(w1[:, i:i + group], scheme)
                    scale[:, g] = sg
                    if zero is not None:
                        zero[:, g] = zg
                s, z = scale[:, g], (zero[:, g] if zero is not None else None)
                c = w1[:, i]
                cq = torch.round(c / s)
                if z is not None:
                    cq += z
                cq.clamp_(lo, hi)
                q1[:, i] = cq
                e = (c - ((cq - z) * s if z is not None else cq * s)) / diag[i]
                if p1 is not None:
                    pre1[:, i] = c
                    w1[:, i + 1:j2] += torch.outer(c, p1[i, i + 1:j2])
                w1[:, i:j2] -= torch.outer(e, hinv1[i, i:j2])
                err1[:, i] = e
            w1[:, j2:] -= err1[:, j1:j2] @ hinv1[j1:j2, j2:]
            if p1 is not None:
                w1[:, j2:] += pre1[:, j1:j2] @ p1[j1:j2, j2:]
        q[:, i1:i2] = q1
        loss += (err1 * err1).sum(1)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        if p is not None:
            w[:, i2:] += pre1 @ p[i1:i2, i2:]
    return q, loss


@register("gptq", "quantize", GPTQConfig,
          "GPTQ weight-only int4/int8 with calibration, block by block; packed, reloads with slimctl",
          loads_with="slimctl", streams=True,
          proposals=(Proposal("int4-gptq-g64", {"bits": 4, "group_size": 64, "act_order": True}, (CAUSAL_LM,), order=55),))
def apply(model, cfg: GPTQConfig, ctx: StepContext) -> dict:
    targets, groups, schemes = plan_schemes(model, cfg, ctx)
    out = gptq_layers(model, targets, schemes, cfg, ctx)
    return {"layers": list(targets), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
            "act_order": cfg.act_order, **out}


def shared_groups(mine: dict, stats, schemes: dict[str, QScheme]) -> list[list[str]]:
    """The layers of `mine` in groups that read the same input (one Hessian: q/k/v, gate/up) and share a scheme:
    GPTQ treats each output row on its own given H, so a group is solved as one matrix of stacked rows (one
    factorisation and one column loop instead of one per layer; the same result up to float rounding)."""
    groups: dict[tuple, list[str]] = {}
    for name in mine:
        groups.setdefault((id(stats.hessian[name]), schemes[name]), []).append(name)
    return list(groups.values())


def gptq_layers(model, targets: dict, schemes: dict[str, QScheme], cfg: GPTQConfig, ctx: StepContext) -> dict:
    """GPTQ on `targets`, each with its own scheme (bits, group); layers outside the repeated blocks
    are rounded to nearest. Returns the calibration record, errors and raised dampening."""
    from ..quant.layers import bits_per_weight

    batches = cfg.batches(ctx)
    errors: dict[str, float] = {}
    damping: dict[str, float] = {}

    def quantize(mine: dict, stats) -> None:
        for names in shared_groups(mine, stats, schemes):
            sch, h = schemes[names[0]], stats.hessian[names[0]]
            ws = [mine[n].weight.detach().float() for n in names]
            cross = getattr(stats, "cross", None) or {}
            cr = cross[names[0]] if all(n in cross for n in names) else None  # one input, one C, as one H
            used: dict[str, float] = {}
            record: dict = {}
            codes, scale, zero = gptq_quantize(torch.cat(ws), h, sch, sch.group_size, cfg.dampening, cfg.act_order,
                                               cfg.block_size, names[0], used, record, cr, getattr(cfg, "gptaq_alpha", 0.25))
            rows = 0
            for name, w in zip(names, ws):
                part = slice(rows, rows + w.shape[0])
                rows += w.shape[0]
                c, s, z = codes[part], scale[part], (zero[part] if zero is not None else None)
                energy = getattr(stats, "out_energy", {}).get(name) if cr is None else None  # GPTAQ: row_loss is not ‖ΔW X̃‖²
                errors[name] = output_error(w, dequantize_groups(c, s, z, sch.group_size), h, record, part, energy)
                damping.update({name: used[names[0]]} if used else {})
                set_submodule(model, name, WeightOnlyLinear.from_codes(mine[name], c, s, z, sch.bits, sch.group_size,
                                                                          sch.scale_dtype))
            for name in names:
                stats.hessian.pop(name, None)

    def blind(layers: dict) -> None:
        from .calibrate import unseen_note
        from .rtn import round_layers

        round_layers(model, layers, schemes)
        ctx.notes.append(unseen_note("gptq", list(layers), "rounded to nearest (RTN) instead"))

    stream = None
    if getattr(cfg, "gptaq", False):
        from ..stream.skeleton import refuse, stream_of
        from .gptaq import FloatStream

        if stream_of(model):
            refuse("gptaq: true (a second stream of activations, the float model's)")
        stream = FloatStream()
    missed = calibrated(model, targets, batches, quantize, hessian=True, track=ctx.track, leftover="return",
                        unseen=blind, float_stream=stream)
    from .rtn import round_outside_blocks

    round_outside_blocks(model, missed, targets, schemes, ctx)
    return {"calibration": summary(batches), "relative_output_error": errors,
            "bits_per_weight": bits_per_weight(model, list(targets)), **raised_dampening(damping, cfg.dampening, ctx)}
