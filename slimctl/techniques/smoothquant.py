"""SmoothQuant W8A8 (Xiao et al. 2022): move activation outliers into the weights with per-channel
factors s = max|X|^α / max|W|^(1-α), folded exactly into the preceding norm or linear, then int8
weights (per channel) x int8 activations (per token, at run time)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..calibrate import InputStats, block_stats, find_blocks, sequential
from ..stream import visit
from ..errors import UnsupportedError
from ..qmodules import Int8Linear, set_submodule
from . import CalibrationOptions, LayerSelection, StepContext, register, select_linears


class SmoothQuantConfig(LayerSelection, CalibrationOptions):
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # migration strength: 0 keeps outliers in activations
    calib_samples: int = Field(default=32, ge=1, le=100_000)


def _mappings(model) -> list[tuple[nn.Module, str, list[str]]]:
    """(previous module, its attribute holding the scale, names of the linears reading its output).

    Only folds that are exact: a norm whose output feeds nothing but the listed linears (pre-norm
    blocks), or v_proj -> o_proj when every query head has its own value head."""
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}"
        attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        if attn is not None and hasattr(b, "input_layernorm") and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            out.append((b.input_layernorm, "weight", [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]))
            if mlp is not None and hasattr(b, "post_attention_layernorm") and hasattr(mlp, "gate_proj"):
                out.append((b.post_attention_layernorm, "weight", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
            cfg = model.config
            if getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) == cfg.num_attention_heads and hasattr(attn, "o_proj"):
                out.append((attn.v_proj, "rows", [f"{p}.self_attn.o_proj"]))
        elif hasattr(b, "attention") and hasattr(b.attention, "self") and hasattr(b.attention.self, "value"):
            # BERT-style post-norm: the LayerNorm output is also the residual, so only value -> output.dense folds
            out.append((b.attention.self.value, "rows", [f"{p}.attention.output.dense"]))
    if not out:
        raise UnsupportedError("SmoothQuant knows Llama-style (input_layernorm/q,k,v_proj) and BERT-style blocks; "
                               f"{type(model).__name__} has neither")
    return out


@register("smoothquant", "quantize", SmoothQuantConfig,
          "SmoothQuant smoothing (alpha) + int8 weights x per-token int8 activations; reloads with slimctl",
          loads_with="slimctl", streams=True)
def apply(model, cfg: SmoothQuantConfig, ctx: StepContext) -> dict:
    """Block by block: the float block's input maxima, the smoothing folded in, the (smoothed, still
    float) block's outputs passed on, then its Linears made int8; so every block is measured on the
    float model's activations, as a whole-model calibration pass measures them."""
    maps = _mappings(model)
    layers = select_linears(model, cfg.ignore)
    smoothed: dict[str, dict[str, float]] = {}
    done: set[str] = set()

    def on_block(i, name, block, inputs):
        mine = [(prev, how, names) for prev, how, names in maps if names[0].startswith(name + ".")]
        consumers = {n: model.get_submodule(n) for _, _, names in mine for n in names}
        stats = block_stats(block, inputs, consumers)
        with torch.no_grad():
            for prev, how, names in mine:
                smoothed.update(_smooth(prev, how, [consumers[n] for n in names], names, stats, cfg.alpha))

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


def _smooth(prev: nn.Module, how: str, lins: list[nn.Linear], names: list[str], stats: InputStats,
            alpha: float) -> dict[str, dict[str, float]]:
    """s = max|X|^α / max|W|^(1-α) per input channel, divided out of `prev` and multiplied into `lins`."""
    act = stats.absmax[names[0]].clamp(min=1e-5)
    wmax = torch.stack([l.weight.detach().abs().float().amax(0) for l in lins]).amax(0).clamp(min=1e-5)
    s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
    if how == "weight":
        prev.weight.div_(s.to(prev.weight.dtype))
    else:
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for l in lins:
        l.weight.mul_(s[None, :].to(l.weight.dtype))
    return {n: {"max_scale": float(s.max()), "min_scale": float(s.min())} for n in names}
