"""Fast execution of slimctl's weight-only layers, chosen at load for the device found.

int4 groups are repacked for torch's fused int4 kernels (CPU: `_weight_int4pack_mm_for_cpu`; CUDA
sm80+: tinygemm `_weight_int4pack_mm`), per-channel symmetric int8 runs on `_weight_int8pack_mm`
(CPU). These kernels take bf16 activations, so a model with fused layers runs in bf16 where bf16 is
fast (AVX512-BF16/AMX CPUs, sm80+ GPUs). The artifact on disk is unchanged: the packed copies live
beside the stored buffers, outside the state dict. A layer no kernel takes (a group size or shape it
refuses) keeps the dequantize path, and the plan names it.
"""
from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

INT4_GROUPS = (32, 64, 128, 256)  # what both int4 kernels accept


@dataclass
class KernelPlan:
    """What `accelerate` did: the activation dtype, and per layer the kernel or why none."""

    device: str
    act_dtype: str
    fused: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0  # memory of the dense copies that `batch` mode keeps beside the stored weights

    def to_dict(self) -> dict[str, Any]:
        kinds = dict(Counter(self.fused.values()))
        return {"device": self.device, "act_dtype": self.act_dtype, "fused_layers": len(self.fused), "kernels": kinds,
                "dense_copy_mb": round(self.dense_bytes / 2**20, 2),
                "dequantize_layers": len(self.fallback), "dequantize": self.fallback, "warning": self.warning()}

    def warning(self) -> str | None:
        total = len(self.fused) + len(self.fallback)
        if not self.fallback:
            return None
        names = ", ".join(f"{n} ({why})" for n, why in list(self.fallback.items())[:3])
        more = f", and {len(self.fallback) - 3} more" if len(self.fallback) > 3 else ""
        return f"{len(self.fallback)} of {total} quantized Linear layers run the slow dequantize path: {names}{more}"


@functools.lru_cache(maxsize=None)
def bf16_fast(device_type: str) -> tuple[bool, str]:
    """(True, why) where bf16 matmuls are native: AVX512-BF16 or AMX on the CPU, sm80+ on CUDA."""
    if device_type == "cuda":
        cap = torch.cuda.get_device_capability()
        return cap >= (8, 0), f"compute capability {cap[0]}.{cap[1]}"
    from ..machine import cpu_flags

    flags = cpu_flags()
    for f in ("amx_bf16", "avx512_bf16"):
        if f in flags:
            return True, f
    return False, "no AVX512-BF16 or AMX on this CPU"


def _inner_k_tiles(k: int) -> int | None:
    """tinygemm's packing parameter: the largest of 8, 4, 2 with K divisible by 16 x tiles."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def choose(layer, device_type: str) -> tuple[str | None, str]:
    """(kernel, "") for a WeightOnlyLinear on this device, or (None, why it keeps the dequantize path)."""
    if not bf16_fast(device_type)[0]:
        return None, f"bf16 is not native here ({bf16_fast(device_type)[1]})"
    if layer.bits in (3, 4):  # int3 codes are a subset of int4's: the int4 kernels run them (4 bits in memory)
        if layer.group_size not in INT4_GROUPS:
            return None, f"int{layer.bits} group {layer.group_size} (the kernels take {', '.join(map(str, INT4_GROUPS))})"
        if device_type == "cuda":
            if layer.out_features % 8 or _inner_k_tiles(layer.in_features) is None:
                return None, f"shape {layer.out_features}x{layer.in_features} (tinygemm needs N % 8 and K % 32)"
            return "int4-tinygemm", ""
        if layer.in_features % 2:
            return None, f"odd input width {layer.in_features}"
        if layer.out_features % 16:  # _convert_weight_to_int4pack_for_cpu refuses it (e.g. Qwen2-MoE's 1-wide gate)
            return None, f"output width {layer.out_features} (the CPU int4 kernel needs a multiple of 16)"
        return "int4-cpu", ""
    if layer.bits == 8:
        if not layer.symmetric or layer.group_size != layer.in_features:
            return None, "int8 with groups or zero points (the int8 kernel takes one scale per output channel)"
        if device_type != "cpu":
            return None, "int8 weight-only on CUDA: torch's int8pack kernel is not used there (dequantize + bf16 matmul)"
        return "int8-cpu", ""
    return None, f"{layer.bits}-bit"


def _int4_params(layer, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes q in [0, 15] with w = (q - 8) * s + z: tinygemm's layout [K/g, N, 2] of (s, z).
    Symmetric: stored codes c = q - 8, so z = 0. Asymmetric: w = (q - zp) * s, so z = (8 - zp) * s."""
    from .integer import unpack_int4

    if layer.bits == 3:  # w = c·s (c in −4..3) or (u − zp)·s (u in 0..7): the same values as int4 codes c + 8 / u
        q = (layer.codes() + (8 if layer.symmetric else 0)).to(torch.int32)
    else:
        q = unpack_int4(layer.qweight, symmetric=False).to(torch.int32)  # the stored unsigned nibbles
    s = layer.weight_scale.float()
    z = torch.zeros_like(s) if layer.symmetric else (8.0 - layer.weight_zero_point.float()) * s
    sz = torch.stack([s, z], dim=2).transpose(0, 1).contiguous().to(act_dtype)
    return q, sz


def _pack(layer, kernel: str, act_dtype: torch.dtype) -> dict[str, Any]:
    dev = layer.qweight.device
    if kernel == "dense":
        return {"w": layer.dequantized(act_dtype).contiguous()}
    if kernel == "int8-cpu":
        return {"w": layer.qweight.contiguous(), "s": layer.weight_scale[:, 0].to(act_dtype).contiguous()}
    q, sz = _int4_params(layer, act_dtype)
    if kernel == "int4-cpu":
        return {"w": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), "sz": sz}
    tiles = _inner_k_tiles(layer.in_features)
    u8 = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(dev)  # CUDA packing takes [N, K/2] uint8, high nibble first
    return {"w": torch.ops.aten._convert_weight_to_int4pack(u8, tiles), "sz": sz.to(dev)}


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's matmul on its fused kernel; x in the activation dtype the plan chose."""
    p = layer._fused
    if layer._kernel == "dense":  # a plain GEMM with the bias fused in (addmm): one pass over the output
        xin = x if x.dtype == p["dtype"] else x.to(p["dtype"])
        bias = layer.bias if layer.bias is None or layer.bias.dtype == xin.dtype else layer.bias.to(xin.dtype)
        return torch.nn.functional.linear(xin, p["w"], bias).to(x.dtype)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != p["dtype"]:
        x2 = x2.to(p["dtype"])
    if layer._kernel == "int8-cpu":
        y = torch._weight_int8pack_mm(x2, p["w"], p["s"])
    elif layer._kernel == "int4-cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p["w"], layer.group_size, p["sz"])
    else:
        y = torch.ops.aten._weight_int4pack_mm(x2, p["w"], layer.group_size, p["sz"])
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def has_weight_only(model: nn.Module) -> bool:
    from .layers import Int8Embedding, WeightOnlyLinear

    return any(isinstance(m, (WeightOnlyLinear, Int8Embedding)) for m in model.modules())


def maybe_accelerate(model: nn.Module, mode: str, device: str | torch.device | None = None,
                     kind: str | None = None) -> dict[str, Any] | None:
    """`accelerate` unless mode is "off" or the model has no weight-only layers; the plan as a dict.
    Encoders and classifiers (`kind` other than a causal LM) run large batches: see `accelerate`."""
    if mode == "off" or not isinstance(model, nn.Module) or not has_weight_only(model):
        return None
    return accelerate(model, device, batch=kind not in (None, "causal-lm")).to_dict()


def accelerate(model: nn.Module, device: str | torch.device | None = None, act_dtype: str = "auto",
               batch: bool = False) -> KernelPlan:
    """Put every WeightOnlyLinear of `model` on the fastest kernel this device has, and run the
    model in bf16 when any layer got one (`act_dtype="auto"`) or as asked ("bf16"/"fp32").

    `batch` (encoders: many tokens per matmul, where the fused kernels are built for one) instead
    dequantizes each layer once, at load, into a dense weight in the activation dtype: the disk keeps
    the small artifact, memory holds the dense copy (counted in the plan). The quantized layers keep
    their stored scales in float32 for the dequantize path."""
    from .layers import Int8Embedding, WeightOnlyLinear

    dev = torch.device(device) if device is not None else _model_device(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    picks = {n: ("dense", "") if batch else choose(m, dev.type) for n, m in layers.items()}
    fused_any = any(k for k, _ in picks.values())
    fast = bf16_fast(dev.type)[0]
    want = torch.bfloat16 if (act_dtype == "bf16" or (act_dtype == "auto" and fused_any and (fast or not batch))) else None
    plan = KernelPlan(dev.type, "bfloat16" if want is not None else str(_float_dtype(model)).replace("torch.", ""))
    if want is not None:
        _cast_float(model, want)
    dtype = want or _float_dtype(model)
    for m in model.modules():
        if isinstance(m, Int8Embedding):
            m.out_dtype = dtype
            m.dense = m.dequantized(dtype) if batch else None  # a batch looks up many rows: one gather, no rescale
            plan.dense_bytes += m.dense.numel() * m.dense.element_size() if batch else 0
    for n, m in layers.items():
        kernel, why = picks[n]
        if kernel is None or (want is None and kernel != "dense"):
            m.set_kernel(None, None)
            plan.fallback[n] = why or "activations are not bf16"
            continue
        packed = _pack(m, kernel, dtype)
        m.set_kernel(kernel, {**packed, "dtype": dtype}, fused_forward)
        plan.fused[n] = kernel
        if kernel == "dense":
            plan.dense_bytes += packed["w"].numel() * packed["w"].element_size()
    return plan


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _offset_norms(model: nn.Module) -> set[int]:
    """Norms whose weight w enters as x̂ · (1 + w) (Gemma). An AWQ or SmoothQuant fold divides 1 + w by its
    scale, leaving w near -1: in bf16, 1 + w then loses most of its digits to cancellation (measured on
    Gemma 3 270M AWQ+GPTQ g32: perplexity x1.26 with bf16 norms, x1.13 with float32 ones, llama.cpp x1.11).
    They stay float32; their forward computes in float32 and returns the input's dtype."""
    from .. import families

    fam = families.of(model)
    if fam is None or not fam.norm_offset:
        return set()
    return {id(m) for m in model.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None}


def _cast_float(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters to `dtype`. Buffers stay as they are: the quantized layers' scales (for
    their dequantize path) and RoPE's inverse frequencies, which transformers computes in float32.
    Gemma's 1 + w norms keep float32 weights (see _offset_norms)."""
    keep = _offset_norms(model)
    for mod in model.modules():
        if id(mod) in keep:
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
