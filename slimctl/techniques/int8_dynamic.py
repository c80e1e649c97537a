"""Dynamic int8: int8 weights per output channel, activations quantized per token at run time.

Chosen by measurement on minilm-l6 (batch 8x128, 2 threads, this repo's README): per-token
activation scales with torch._int_mm kept cosine 0.998 at 1.48x, where torch.ao's per-tensor
fbgemm path gave 0.939 at 1.73x (per-channel 0.982 at 1.75x).
"""
from __future__ import annotations

from ..quant.layers import Int8Linear
from ..stream.skeleton import set_submodule
from .registry import LayerSelection, Proposal, StepContext, register, select_linears


class Int8DynamicConfig(LayerSelection):
    pass


@register("int8-dynamic", "quantize", Int8DynamicConfig,
          "int8 weights (per channel) x int8 activations (per token, at run time); reloads with slimctl",
          loads_with="slimctl", proposals=(Proposal("int8-dynamic", order=20),))
def apply(model, cfg: Int8DynamicConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    for name, lin in layers:
        set_submodule(model, name, Int8Linear.from_linear(lin, act="dynamic"))
    return {"layers": [n for n, _ in layers], "weight_bits": 8, "activation_bits": 8}
