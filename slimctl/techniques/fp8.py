"""FP8 (e4m3) weights per output channel with dynamic per-token activation scaling, executed by
torch._scaled_mm on GPUs with native FP8 (compute capability >= 8.9); refused elsewhere."""
from __future__ import annotations

import torch

from ..errors import UnsupportedError
from ..quant.fp8 import Fp8Linear, fp8_supported
from ..stream.skeleton import set_submodule
from .registry import LayerSelection, StepContext, register, select_linears


class Fp8Config(LayerSelection):
    allow_emulation: bool = False  # run anyway without native FP8 (dequantized float32 matmuls: for checking accuracy, never faster)


@register("fp8", "quantize", Fp8Config,
          "FP8 e4m3 weights + dynamic per-token e4m3 activations (CUDA, compute capability >= 8.9); reloads with slimctl",
          loads_with="slimctl")
def apply(model, cfg: Fp8Config, ctx: StepContext) -> dict:
    ok, why = fp8_supported()
    if not ok and not cfg.allow_emulation:
        raise UnsupportedError(f"FP8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper, Blackwell); {why}. "
                               "Use int8-dynamic or w8a8-smoothquant on this machine, or set allow_emulation to measure accuracy only")
    if not ok:
        ctx.notes.append(f"FP8 emulated ({why}): accuracy is FP8's, speed is not")
    layers = select_linears(model, cfg.ignore)
    err = {}
    for name, lin in ctx.track(layers, "fp8", len(layers)):
        q = Fp8Linear.from_linear(lin)
        w = lin.weight.detach().float()
        err[name] = float((q.dequantized(torch.float32) - w).norm() / w.norm().clamp(min=1e-12))
        set_submodule(model, name, q)
    return {"layers": list(err), "native": ok, "relative_weight_error": err}

