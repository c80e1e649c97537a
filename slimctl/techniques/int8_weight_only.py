"""Weight-only int8: per-output-channel round-to-nearest, stored as real int8 with float scales."""
from __future__ import annotations

from ..qmodules import Int8Linear, set_submodule
from . import LayerSelection, StepContext, register, select_linears


class Int8WeightOnlyConfig(LayerSelection):
    pass


@register("int8-weight-only", "quantize", Int8WeightOnlyConfig,
          "int8 weights per output channel (RTN), activations unchanged; reloads with slimctl",
          loads_with="slimctl")
def apply(model, cfg: Int8WeightOnlyConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    err = {}
    for name, lin in layers:
        q = Int8Linear.from_linear(lin, act="none")
        w = lin.weight.detach().float()
        err[name] = float((q.dequantized(w.dtype) - w).norm() / w.norm().clamp(min=1e-12))
        set_submodule(model, name, q)
    return {"layers": list(err), "weight_bits": 8, "relative_weight_error": err}
