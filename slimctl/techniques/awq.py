"""AWQ (Lin et al. 2023): activation-aware weight quantization. Per block, for each group of Linears
reading one output (a norm's, or another Linear's), grid-search per-input-channel scales
s = mean|x|^α / mean|ŵ|^(1-α) (α in [0, 1), 20 steps, as AutoAWQ does, plus s = 1 as llm-compressor
adds) on the loss of the module they feed, fold s exactly into the producer (÷s) and the Linears'
columns (×s), then search a clipping range per weight group, then round to nearest in groups
(int4/int8). The next block is calibrated on this block's float outputs (`propagate: float`, as
llm-compressor's sequential pipeline does) or on its quantized ones (`propagate: quantized`). With
`quantize: false` (set for you when a `gptq` or `mixed` step follows) the scaled, clipped float
weights are left for that step to quantize."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..results import stages
from . import precision
from .calibrate import BATCH_TOKENS, block_flops, run_block, sequential, summary, texts
from ..families import of
from ..families.folding import BlockFold, block_folds, expand, fold_scale, reduce
from ..quant.integer import QScheme, dequantize_groups, rtn
from ..quant.layers import bits_per_weight
from .rtn import round_layers
from .registry import CalibrationOptions, StepContext, WeightOnlyOptions, plan_schemes, register


class AWQConfig(WeightOnlyOptions, CalibrationOptions):
    grid: int = Field(default=20, ge=2, le=200)  # α steps in [0, 1)
    # full: score every α of the grid (AutoAWQ's search); refine: every `refine_stride`-th α, then the α's between
    # the best of those and its neighbours (the same α as the full grid whenever the loss has one minimum between
    # coarse points; 13 of 21 evaluations at grid 20, stride 2)
    grid_search: Literal["full", "refine"] = "full"
    refine_stride: int = Field(default=2, ge=2, le=50)
    duo_scaling: bool = True  # divide by the weights' mean magnitude too (AutoAWQ / llm-compressor default)
    clip: bool = True  # search a clipping range per weight group after scaling
    clip_grid: int = Field(default=20, ge=2, le=200)
    max_shrink: float = Field(default=0.5, gt=0, lt=1)  # clipping tries max|w| × (1 - k/clip_grid) down to this
    clip_tokens: int = Field(default=512, ge=16, le=65_536)  # calibration tokens sampled for the clip search
    quantize: bool = True  # false: leave scaled, clipped float weights for a following gptq/mixed step
    calib_samples: int = Field(default=32, ge=1, le=100_000)
    # calibration texts whose outputs score each α (mean |x| and clipping use all of them): the grid
    # runs each layer group 20 times, so this bounds AWQ's time on a CPU
    search_samples: int = Field(default=8, ge=1, le=100_000)
    # what the next block is calibrated on: this block's float outputs (scaled: the same function), or
    # its outputs after clipping and rounding
    propagate: Literal["float", "quantized"] = "float"
    # calib_dtype auto stays float32: the α grid's losses differ by less than bf16's rounding (int4-awq-gptq-g32 on
    # smollm2-135m, AMD EPYC: x1.1278 BBC with AWQ in bf16 against x1.1092; docs/results/cost.md)
    auto_bf16: ClassVar[bool] = False


class _Capture:
    """Inputs (args, kwargs) and outputs of named modules of a block over all calibration inputs."""

    def __init__(self, block: nn.Module, names: list[str], outputs: list[str] | None = None):
        self.calls: dict[str, list] = {n: [] for n in names}
        self.outs: dict[str, list] = {n: [] for n in (names if outputs is None else outputs)}
        self._hooks = []
        for n in names:
            mod = block.get_submodule(n)
            self._hooks.append(mod.register_forward_pre_hook(self._pre(n), with_kwargs=True))
            if n in self.outs:
                self._hooks.append(mod.register_forward_hook(self._post(n)))

    def _pre(self, n):
        def fn(mod, args, kwargs):
            self.calls[n].append((args, dict(kwargs)))
        return fn

    def _post(self, n):
        def fn(mod, args, out):
            self.outs[n].append(out[0] if isinstance(out, (tuple, list)) else out)
        return fn

    def run(self, block: nn.Module, inputs: list) -> "_Capture":
        try:
            with torch.inference_mode():
                for a, k in inputs:
                    run_block(block, a, k)
        finally:
            for h in self._hooks:
                h.remove()
        return self

    def first_input(self, n: str) -> torch.Tensor:
        """The module's first positional (or hidden_states) input over all calls, as rows [tokens, features]."""
        xs = [(a[0] if a else k["hidden_states"]) for a, k in self.calls[n]]
        return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])


def _pseudo(w: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """W after quantizing and dequantizing it (scheme.group_size is the group actually used)."""
    return dequantize_groups(*rtn(w, scheme, scheme.group_size), scheme.group_size)


def _loss(block, fold: BlockFold, cap: _Capture, samples: int) -> float:
    mod = block.get_submodule(fold.inspect)
    err, n = 0.0, 0
    with torch.inference_mode():
        calls = cap.calls[fold.inspect]
        first = _first_texts(calls, samples)
        for (a, k), ref in zip(calls[:first], cap.outs[fold.inspect][:first]):
            x = a[0] if a else k.get("hidden_states")
            stages.add_flops(stages.SEARCH, block_flops(mod, x) if mod is not block else 0.0)
            with precision.forward():
                out = mod(*a, **k)
            out = out[0] if isinstance(out, (tuple, list)) else out
            err += float((out.float() - ref.float()).pow(2).sum())
            n += ref.numel()
    return err / max(n, 1)


def _first_texts(calls: list, samples: int) -> int:
    """How many of the first calls hold `samples` calibration texts (a call may hold several stacked texts)."""
    seen = 0
    for i, item in enumerate(calls):
        seen += texts(item)
        if seen >= samples:
            return i + 1
    return len(calls)


def search_scale(block, fold: BlockFold, cap: _Capture, schemes: dict[str, QScheme], cfg: AWQConfig):
    """The α with the least loss, whether its s divides by the weights' mean too (α = 0 without: s = 1),
    its scale s per prev channel, the loss at s = 1 and the least loss."""
    with stages.stage(stages.SEARCH):
        return _search_scale(block, fold, cap, schemes, cfg)


def _search_scale(block, fold: BlockFold, cap: _Capture, schemes: dict[str, QScheme], cfg: AWQConfig):
    lins = [block.get_submodule(n) for n in fold.linears]
    originals = [l.weight.detach().clone() for l in lins]
    x_mean = reduce(cap.first_input(fold.linears[0]).abs().mean(0), fold)
    w_mean = None
    if cfg.duo_scaling:
        g = min(s.group_size for s in schemes.values()) if schemes else lins[0].weight.shape[1]
        w = torch.cat([o.float() for o in originals])
        wg = w.abs().reshape(-1, g)
        w_mean = reduce((wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0), fold)
    # s = 1 first (plain rounding), then the α grid
    has_w = w_mean is not None
    grid = [(0.0, False)] * has_w + [(k / cfg.grid, has_w) for k in range(cfg.grid)]

    def scale(i: int) -> torch.Tensor:
        alpha, duo = grid[i]
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        return s

    def score(i: int) -> float:
        cols = expand(scale(i), fold)[None, :]
        with torch.no_grad():
            for name, lin, w0 in zip(fold.linears, lins, originals):
                if name in schemes:
                    lin.weight.copy_((_pseudo(w0.float() * cols, schemes[name]) / cols).to(w0.dtype))
        return _loss(block, fold, cap, cfg.search_samples)

    try:
        losses = _grid_losses(score, len(grid), int(has_w), cfg)
    finally:
        with torch.no_grad():
            for lin, w0 in zip(lins, originals):
                lin.weight.copy_(w0)
    best = min(losses, key=lambda i: (_finite(losses[i]), i))  # ties: the earlier grid point, as a full scan keeps it
    return grid[best][0], grid[best][1], scale(best), losses[0], losses[best]


def _finite(loss: float) -> float:
    return loss if loss == loss else float("inf")  # a NaN loss never wins


def _grid_losses(score, points: int, first: int, cfg: AWQConfig) -> dict[int, float]:
    """Losses of the grid points scored, by index: all of them (`full`), or the points before `first` (s = 1),
    every refine_stride-th α, then the unscored α's within a stride of the best of those (`refine`)."""
    if cfg.grid_search == "full":
        return {i: score(i) for i in range(points)}
    stride = cfg.refine_stride
    losses = {i: score(i) for i in [*range(first), *range(first, points, stride)]}
    coarse = min((i for i in losses if i >= first), key=lambda i: (_finite(losses[i]), i))
    for i in range(max(first, coarse - stride + 1), min(points, coarse + stride)):
        if i not in losses:
            losses[i] = score(i)
    return losses


def apply_fold(block, fold: BlockFold, s: torch.Tensor, inverse: bool = False) -> None:
    """prev ÷ s, Linear columns × s (inverse=True undoes it)."""
    fold_scale(block, fold, s, inverse)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-4


def clip_range(w: torch.Tensor, x: torch.Tensor, scheme: QScheme, grid: int, max_shrink: float) -> torch.Tensor:
    """Per (row, group) max |w| that minimises ‖x·w − x·Q(clamp(w))‖² over the sampled inputs x [tokens, in]."""
    out_f, in_f = w.shape
    group = scheme.group_size
    with stages.stage(CLIP, 2.0 * x.shape[0] * in_f * group + 2.0 * out_f * in_f * group * int(max_shrink * grid)):
        return _clip_range(w, x, scheme, grid, max_shrink)


CLIP = "clip search"


def _clip_range(w: torch.Tensor, x: torch.Tensor, scheme: QScheme, grid: int, max_shrink: float) -> torch.Tensor:
    """The error of a candidate per (row, group), ‖x_g (w_g − q_g)‖² / tokens, is computed as d_gᵀ G_g d_g with
    the group's Gram matrix G_g = x_gᵀ x_g / tokens (made once): the same quantity as AutoAWQ's explicit
    products, with group² instead of tokens x out work per group and no [groups, tokens, out] temporaries."""
    out_f, in_f = w.shape
    group = scheme.group_size
    ng = in_f // group
    wg = w.float().reshape(out_f, ng, group)
    xg = x.float().reshape(-1, ng, group).transpose(0, 1)  # [ng, tokens, group]
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]  # [ng, group, group]
    amax = wg.abs().amax(-1)  # [out, ng]
    best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for k in range(int(max_shrink * grid)):
        mx = amax * (1 - k / grid)
        cur = torch.maximum(torch.minimum(wg, mx[..., None]), -mx[..., None])
        q = _pseudo(cur.reshape(out_f, in_f), scheme).reshape(out_f, ng, group)
        d = (wg - q).transpose(0, 1)  # [ng, out, group]
        err = (torch.bmm(d, gram) * d).sum(-1).T  # [out, ng]
        better = err < best_err
        best_err[better], best[better] = err[better], mx[better]
    return best


def _clipped(model, mine: dict[str, nn.Linear]) -> list[str]:
    """The Linears whose clipping range is searched (not the query/key projections, as in AutoAWQ)."""
    fam = of(model)
    no_clip = fam.no_clip if fam else ("q_proj", "k_proj", "query", "key")
    return [n for n in mine if not any(t in n.rsplit(".", 1)[-1] for t in no_clip)]


def _clip(mine: dict[str, nn.Linear], schemes, cap: _Capture, names: list[str], divide: dict[str, torch.Tensor],
          cfg: AWQConfig) -> tuple[dict[str, float], dict]:
    """The clipping range per (row, group) of each clipped Linear, searched on the block's inputs captured before
    the folds, divided by the scale a fold multiplied the Linear's columns by (what its input is now; as AutoAWQ
    scales its cached input features). The weights are not changed here (`clip_weights` applies the ranges).
    Returns the ranges and their mean share of max |w|."""
    shrink, bounds = {}, {}
    for n in names:
        if not cap.calls[n]:  # no calibration token reached it: rounded without a clipping search
            continue
        x = cap.first_input(n)
        x = x[:: max(1, x.shape[0] // cfg.clip_tokens)]
        if n in divide:
            x = x / divide[n]
        lin, grp = mine[n], schemes[n].group_size
        amax = lin.weight.detach().float().abs().reshape(lin.out_features, -1, grp).amax(-1).clamp(min=1e-12)
        bounds[n] = clip_range(lin.weight.detach(), x, schemes[n], cfg.clip_grid, cfg.max_shrink)
        shrink[n] = round(float((bounds[n] / amax).mean()), 4)
    return shrink, bounds


def clip_weights(mine: dict[str, nn.Linear], bounds: dict[str, torch.Tensor]) -> None:
    """Clamp each Linear's weights to its range per (row, group)."""
    for n, mx in bounds.items():
        lin = mine[n]
        g = mx.repeat_interleave(lin.in_features // mx.shape[1], dim=1).to(lin.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.maximum(torch.minimum(lin.weight, g), -g))


def awq_block(model, block, mine: dict[str, nn.Linear], schemes, inputs, cfg: AWQConfig) -> tuple[dict, dict]:
    """Scale search and folds, then the clipping search, for one block (names in `mine` are relative to it),
    from one capture of the block's inputs (AutoAWQ's cached input features): each fold is exact, so the
    module a later fold inspects sees the same inputs, and a folded Linear's input is the captured one ÷ s.
    Returns the record and the clipping ranges, which the caller applies (`clip_weights`): with
    `propagate: float` only after the next block's inputs are computed from the folded float block."""
    chosen, skipped = block_folds(model, block)
    chosen = [f for f in chosen if any(n in schemes for n in f.linears)]
    clipped = _clipped(model, mine) if cfg.clip else []
    inspected = list(dict.fromkeys(f.inspect for f in chosen))
    cap = _Capture(block, list(dict.fromkeys(inspected + [f.linears[0] for f in chosen] + clipped)), inspected)
    cap.run(block, inputs)
    ref = [run_block(block, a, k) for a, k in inputs[:1]]
    rec = {"folds": {}, "skipped": list(skipped)}
    divide: dict[str, torch.Tensor] = {}  # Linear -> what a fold multiplied its input columns by
    for fold in chosen:
        if not cap.calls[fold.linears[0]]:  # an expert the router never chose on this text
            rec["skipped"].append(f"{fold.prev} -> {', '.join(fold.linears)} (no calibration token reached it)")
            continue
        alpha, duo, s, rtn_loss, loss = search_scale(block, fold, cap, schemes, cfg)
        apply_fold(block, fold, s)
        with torch.inference_mode():
            now = [run_block(block, a, k) for a, k in inputs[:1]]
        if not all(_same(x, y) for x, y in zip(now, ref)):  # e.g. a norm computing x·(1 + w)
            apply_fold(block, fold, s, inverse=True)
            rec["skipped"].append(f"{fold.prev} -> {', '.join(fold.linears)} (the fold changed the block's output)")
            continue
        divide.update({n: expand(s, fold)[None, :] for n in fold.linears})
        rec["folds"][fold.prev] = {"alpha": alpha, "duo_scaling": duo, "loss_rtn": rtn_loss, "loss_awq": loss}
    bounds = {}
    if cfg.clip:
        rec["clip_mean_range"], bounds = _clip(mine, schemes, cap, clipped, divide, cfg)
    return rec, bounds


def _before(c: AWQConfig, nxt_method: str, n, index: int) -> AWQConfig:
    """AWQ directly before GPTQ or mixed (the recipe's pairing): AWQ scales and clips for the grid the next step
    rounds to (for mixed its lowest width: int3 when it offers one, else int4), and leaves float weights for it."""
    low3 = nxt_method == "mixed" and n.group_size_3
    grid = {"bits": 3 if low3 else 4 if nxt_method == "mixed" else n.bits, "group_size": n.group_size_3 if low3 else n.group_size,
            "symmetric": n.symmetric, "fp16_scales": n.fp16_scales}
    for key, value in grid.items():
        if key in c.model_fields_set and getattr(c, key) != value:
            raise ValueError(f"steps[{index}]: awq's {key} {getattr(c, key)} differs from the {nxt_method} step's {value}; "
                             f"AWQ must search for the grid the {nxt_method} step quantizes to (drop it from the awq step)")
    if "quantize" in c.model_fields_set and c.quantize:
        raise ValueError(f"steps[{index}]: awq with quantize: true before {nxt_method} would quantize twice; drop quantize")
    return c.model_copy(update={**grid, "quantize": False})


@register("awq", "quantize", AWQConfig,
          "AWQ activation-aware scales (exact folds) + clipping search, then int4/int8 groups; reloads with slimctl",
          loads_with="slimctl", streams=True, precedes=("gptq", "mixed"), pair=_before)
def apply(model, cfg: AWQConfig, ctx: StepContext) -> dict:
    targets, groups, schemes = plan_schemes(model, cfg, ctx)
    batches = cfg.batches(ctx)
    per_block: dict[str, dict] = {}
    done: set[str] = set()
    pending: dict[str, tuple[dict, dict]] = {}  # block -> (its Linears, clipping ranges) to apply after propagation

    def finish(prefix: str, mine: dict[str, nn.Linear], bounds: dict) -> None:
        clip_weights(mine, bounds)
        if cfg.quantize:
            round_layers(model, {f"{prefix}.{n}": m for n, m in mine.items()}, schemes)

    def on_block(i, prefix, block, inputs):
        mine = {n[len(prefix) + 1:]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if not mine:
            return
        local = {n[len(prefix) + 1:]: v for n, v in schemes.items() if n.startswith(prefix + ".")}
        with torch.no_grad():
            per_block[prefix], bounds = awq_block(model, block, mine, local, inputs, cfg)
        done.update(f"{prefix}.{n}" for n in mine)
        if cfg.propagate == "float":
            pending[prefix] = (mine, bounds)
        else:
            finish(prefix, mine, bounds)

    def after_block(i, prefix, block):
        if prefix in pending:
            finish(prefix, *pending.pop(prefix))

    sequential(model, batches, on_block, ctx.track, after_block, batch_tokens=BATCH_TOKENS,
               batch_breaks=(cfg.search_samples,))  # the texts that score each α are whole batches
    rest = {n: m for n, m in targets.items() if n not in done}
    if cfg.quantize and rest:
        round_layers(model, rest, schemes)
        ctx.notes.append(f"{len(rest)} layers outside the repeated blocks were rounded to nearest without AWQ scales: "
                         f"{', '.join(list(rest)[:3])}")
    skipped = sorted({s for r in per_block.values() for s in r["skipped"]})
    if skipped:
        ctx.notes.append(f"AWQ found no exact fold for: {'; '.join(skipped)}; those groups kept scale 1 "
                         "(clipping and rounding still apply)")
    out = {"layers": list(targets), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
           "quantized": cfg.quantize, "propagate": cfg.propagate, "calibration": summary(batches),
           "blocks": per_block, "folds_skipped": skipped}
    if cfg.quantize:
        out["bits_per_weight"] = bits_per_weight(model, list(targets))
    return out
