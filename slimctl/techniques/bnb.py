"""bitsandbytes NF4 / FP4 (4-bit, optional double quantization) and LLM.int8 through transformers'
BitsAndBytesConfig, on CPU (bitsandbytes >= 0.45) or CUDA; the artifact reloads with plain
transformers + bitsandbytes."""
from __future__ import annotations

import fnmatch
import logging
import tempfile
from typing import Literal

from ..errors import UnsupportedError
from .registry import LayerSelection, StepContext, protected_modules, register


# bitsandbytes logs a warning on every import on AVX512-BF16 CPUs when the optional `kernels` package
# (a fused CPU 4-bit GEMM fetched from the hub) is absent; it then uses its built-in CPU path, which
# is what slimctl measures. Offline that package cannot be fetched, so the line is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class BnbConfig(LayerSelection):
    mode: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = True  # 4-bit: quantize the per-block scales too (QLoRA's double quantization)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # 4-bit: dtype of the matmuls


def _skips(model, cfg: BnbConfig) -> tuple[list[str], list[str]]:
    """Modules to leave in float: protected ones, user ignores, and Linear layers whose widths the
    kernels cannot take (4-bit: not a multiple of 32, e.g. a 2-class head)."""
    from torch import nn

    keep, odd = set(protected_modules(model)), []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or name in keep:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.ignore):
            keep.add(name)
        elif cfg.mode != "int8" and (mod.in_features % 32 or mod.out_features % 32):
            keep.add(name)
            odd.append(name)
    return sorted(keep), odd


@register("bnb", "quantize", BnbConfig,
          "bitsandbytes NF4/FP4 (double quant) or LLM.int8 via BitsAndBytesConfig; reloads with plain transformers + bitsandbytes")
def apply(model, cfg: BnbConfig, ctx: StepContext) -> dict:
    try:
        import bitsandbytes  # noqa: F401
        import torch
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UnsupportedError("bitsandbytes is not installed: pip install 'slimctl[gpu]' (it runs on CPU too)") from None
    from ..kinds import auto_class

    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise UnsupportedError("bnb starts from float32 weights; put no cast or other quantization step before it")
    skip, odd = _skips(model, cfg)
    if odd:
        ctx.notes.append(f"{len(odd)} Linear layers with a width not divisible by 32 stay in float (4-bit kernels): {', '.join(odd[:4])}")
    # transformers' `llm_int8_skip_modules` matches by name; keep the names as they are in this model
    qc = BitsAndBytesConfig(load_in_4bit=cfg.mode != "int8", load_in_8bit=cfg.mode == "int8", bnb_4bit_quant_type=
                            "fp4" if cfg.mode == "fp4" else "nf4", bnb_4bit_use_double_quant=cfg.double_quant,
                            bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype), llm_int8_skip_modules=skip)
    with tempfile.TemporaryDirectory(prefix="slimctl-bnb-") as d:
        model.save_pretrained(d, safe_serialization=True)
        ctx.progress(f"quantizing with bitsandbytes ({cfg.mode})")
        new = auto_class(ctx.kind).from_pretrained(d, quantization_config=qc, device_map="cpu", dtype=torch.float32)
    new.eval()
    layers = [n for n, m in new.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    ctx.replacement = new
    return {"mode": cfg.mode, "double_quant": cfg.double_quant if cfg.mode != "int8" else None, "layers": layers,
            "left_float": skip, "bitsandbytes": bitsandbytes.__version__}
