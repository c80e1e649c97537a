"""SmoothQuant W8A8 (Xiao et al. 2022): move activation outliers into the weights with per-channel
factors s = max|X|^α / max|W|^(1-α), folded exactly into the preceding norm or linear, then int8
weights (per channel) x int8 activations (per token, at run time)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .calibrate import block_stats, sequential
from .hessian import InputStats
from ..stream.blocks import find_blocks
from ..families.folding import BlockFold, block_folds, fold_scale, reduce
from ..stream.skeleton import visit
from ..errors import UnsupportedError
from ..quant.layers import Int8Linear
from ..stream.skeleton import set_submodule
from .registry import CalibrationOptions, LayerSelection, Proposal, StepContext, register, select_linears


class SmoothQuantConfig(LayerSelection, CalibrationOptions):
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # migration strength: 0 keeps outliers in activations
    calib_samples: int = Field(default=32, ge=1, le=100_000)


def _mappings(model) -> list[tuple[str, BlockFold]]:
    """(block prefix, fold) for every exact fold the model's family file declares (families.folding)."""
    prefix, blocks = find_blocks(model)
    out, skipped = [], set()
    for i, b in enumerate(blocks):
        folds, why = block_folds(model, b)
        out += [(f"{prefix}.{i}", f) for f in folds]
        skipped.update(why)
    if not out:
        raise UnsupportedError(f"SmoothQuant found no exact fold in {type(model).__name__} "
                               f"({'; '.join(sorted(skipped)) or 'no blocks'}); nothing would be smoothed")
    return out


@register("smoothquant", "quantize", SmoothQuantConfig,
          "SmoothQuant smoothing (alpha) + int8 weights x per-token int8 activations; reloads with slimctl",
          loads_with="slimctl", streams=True,
          proposals=(Proposal("w8a8-smoothquant", {"alpha": 0.5}, order=30),))
def apply(model, cfg: SmoothQuantConfig, ctx: StepContext) -> dict:
    """Block by block: the float block's input maxima, the smoothing folded in, the (smoothed, still
    float) block's outputs passed on, then its Linears made int8; so every block is measured on the
    float model's activations, as a whole-model calibration pass measures them."""
    maps = _mappings(model)
    layers = select_linears(model, cfg.ignore)
    smoothed: dict[str, dict[str, float]] = {}
    done: set[str] = set()

    def on_block(i, name, block, inputs):
        mine = [f for p, f in maps if p == name]
        consumers = {n: block.get_submodule(n) for f in mine for n in f.linears
                     if isinstance(block.get_submodule(n), nn.Linear)}  # a router is scaled, not measured
        stats = block_stats(block, inputs, consumers)
        with torch.no_grad():
            for f in mine:
                smoothed.update({f"{name}.{k}": v for k, v in _smooth(block, f, stats, cfg.alpha).items()})

    def to_int8(i, name, block):
        for n, lin in layers:
            if n.startswith(name + "."):
                set_submodule(model, n, Int8Linear.from_linear(model.get_submodule(n), act="dynamic"))
                done.add(n)

    sequential(model, cfg.batches(ctx), on_block, ctx.track, after_block=to_int8)
    for n, lin in visit(model, [(n, lin) for n, lin in layers if n not in done]):  # outside the blocks
        set_submodule(model, n, Int8Linear.from_linear(lin, act="dynamic"))
    return {"layers": [n for n, _ in layers], "alpha": cfg.alpha, "smoothed": smoothed,
            "weight_bits": 8, "activation_bits": 8}


def _smooth(block: nn.Module, fold: BlockFold, stats: InputStats, alpha: float) -> dict[str, dict[str, float]]:
    """s = max|X|^α / max|W|^(1-α) per input channel, divided out of the producer and multiplied into the readers."""
    first = next(n for n in fold.linears if n in stats.absmax)
    act = reduce(stats.absmax[first], fold, "max").clamp(min=1e-5)
    wmax = torch.stack([block.get_submodule(n).weight.detach().abs().float().amax(0) for n in fold.linears]).amax(0)
    wmax = reduce(wmax, fold, "max").clamp(min=1e-5)
    s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
    fold_scale(block, fold, s)
    return {n: {"max_scale": float(s.max()), "min_scale": float(s.min())} for n in fold.linears}
