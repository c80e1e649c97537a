"""Weight-only round-to-nearest: int8 or int4, per output channel or in groups, stored packed."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..qmodules import WeightOnlyLinear, set_submodule
from ..quant import QScheme, dequantize_groups, rtn
from . import StepContext, WeightOnlyOptions, plan_groups, register, select_linears


class RTNConfig(WeightOnlyOptions):
    """Defaults to int8 per output channel; `bits: 4, group_size: 128` is the usual int4."""

    bits: Literal[4, 8] = 8
    group_size: Optional[int] = Field(default=None, ge=8, le=8192)


@register("rtn", "quantize", RTNConfig,
          "weight-only int8/int4 round-to-nearest, per channel or group-wise, packed; reloads with slimctl",
          loads_with="slimctl")
def apply(model, cfg: RTNConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    groups = plan_groups(layers, cfg, ctx)
    err = {}
    for name, lin in ctx.track(layers, "rtn", len(layers)):
        g = groups[name]
        scheme = QScheme(cfg.bits, g, cfg.symmetric)
        w = lin.weight.detach().float()
        codes, scale, zero = rtn(w, scheme, g)
        err[name] = float((dequantize_groups(codes, scale, zero, g) - w).norm() / w.norm().clamp(min=1e-12))
        set_submodule(model, name, WeightOnlyLinear.from_codes(lin, codes, scale, zero, cfg.bits, g))
    return {"layers": list(err), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
            "relative_weight_error": err}
