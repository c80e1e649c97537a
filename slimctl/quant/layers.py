"""Quantized layers that slimctl writes into artifacts, and the code that rebuilds them on reload.

Weights are stored as real int8 tensors (`qweight`, one row per output channel) with a float32
scale per row (`weight_scale`); nothing here is fake-quantized floats.
"""
from __future__ import annotations

import contextlib
from importlib import import_module
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127

class QuantizedLayer(nn.Module):
    """What every quantized layer shares: its format name in slimctl.json (`FORMAT`; declaring it registers the
    class in FORMATS, the one registration a new layer needs), the buffers that hold its stored weight
    (`STORED`, which storage_bits counts), the caches a move to another device must drop (`CACHES`), and
    `dequantized` / `meta` / `from_meta`, which every layer defines."""

    FORMAT: str = ""
    STORED: tuple[str, ...] = ()
    CACHES: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.FORMAT:
            if cls.FORMAT in FORMATS:
                raise RuntimeError(f"quantized format {cls.FORMAT} registered twice")
            FORMATS[cls.FORMAT] = cls

    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def _filled(self, source: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> "QuantizedLayer":
        """This empty layer holding a quantizer's codes (in its first STORED buffer) and scales, and the source
        layer's bias if it has one."""
        getattr(self, self.STORED[0]).copy_(codes)
        self.weight_scale.copy_(scale)
        if getattr(source, "bias", None) is not None:
            self.bias.data = source.bias.detach().clone()
        return self

    def storage_bits(self) -> tuple[int, int]:
        """(bits stored for the weight, scales and zero points included; weights it stands for)."""
        bits = sum(t.numel() * t.element_size() * 8 for name in self.STORED
                   if isinstance(t := getattr(self, name, None), torch.Tensor))
        return bits, self.weight_count()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_meta(cls, spec: dict[str, Any], dtype) -> "QuantizedLayer":
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): cached copies belong to the old device
        for name in self.CACHES:
            setattr(self, name, None)
        return super()._apply(fn, recurse)


FORMATS: dict[str, type[QuantizedLayer]] = {}  # filled by QuantizedLayer subclasses, by their FORMAT



def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel round-to-nearest: w ≈ q * scale[:, None], q in [-127, 127]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(QuantizedLayer):
    """nn.Linear with int8 weights (per output channel) and int8 activations (W8A8).

    Activations are quantized per token (symmetric int8) at run time and multiplied with
    torch._int_mm (int8 x int8 -> int32). Per-token scales keep each sample's result independent
    of the rest of the batch, unlike per-tensor dynamic quantization. Off the CPU (torch._int_mm
    has shape limits on CUDA) the weight is dequantized and the matmul runs in the activation dtype.
    """

    FORMAT, STORED, CACHES = "int8", ("qweight", "weight_scale"), ("_qweight_t",)

    def __init__(self, in_features: int, out_features: int, bias: bool, act: str = "dynamic",
                 device=None, dtype=torch.float32):
        super().__init__()
        if act != "dynamic":
            raise ValueError(f"act must be 'dynamic', not {act!r}")
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._qweight_t: torch.Tensor | None = None  # cache of the transposed weight for _int_mm

    @classmethod
    def from_linear(cls, lin: nn.Linear, act: str = "dynamic") -> "Int8Linear":
        q, scale = quantize_rows_int8(lin.weight)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, device=lin.weight.device, dtype=lin.weight.dtype)
        return m._filled(lin, q, scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self._forward_dynamic(x)
        y = F.linear(x, self.dequantized(x.dtype))
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _forward_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        xs = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / INT8_MAX
        xq = torch.round(x2 / xs).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        if self._qweight_t is None or self._qweight_t.data_ptr() == 0 or self._qweight_t.shape[1] != self.out_features:
            self._qweight_t = self.qweight.t().contiguous()
        y = torch._int_mm(xq, self._qweight_t).float() * xs * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.act}, bias={self.bias is not None}"

    def meta(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "act": self.act, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_meta(cls, spec: dict[str, Any], dtype) -> "Int8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec.get("act", "dynamic"), dtype=dtype)


@contextlib.contextmanager
def dequantized_once(module: nn.Module):
    """Inside, each weight-only layer of `module` dequantizes its weights once instead of at every call (the
    same weights, so the same outputs): calibration runs a quantized block over every calibration input."""
    layers = [m for m in module.modules() if isinstance(m, WeightOnlyLinear)]
    for m in layers:
        m._once = {}
    try:
        yield
    finally:
        for m in layers:
            m._once = None


class WeightOnlyLinear(QuantizedLayer):
    """nn.Linear with int3, int4 or int8 weights in groups along the input dimension (see slimctl.quant).

    Stored: `qweight` (int4: uint8 [out, in/2], two codes per byte; int3: uint8 [out, 3·in/8], eight codes in
    three bytes; int8: int8 or uint8 [out, in]),
    `weight_scale` float32 [out, in/group] (float16 when the scales were rounded to fp16: `fp16_scales`, then
    16 bits per group, as GGUF's Q4_0 stores them) and, when asymmetric, `weight_zero_point` uint8.
    The forward dequantizes to the activation dtype and runs a dense matmul: this saves memory and
    disk, not compute.
    """

    FORMAT, STORED = "weight-only", ("qweight", "weight_scale", "weight_zero_point")
    CACHES = ("_kernel", "_fused", "_fused_forward")

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool, device=None, dtype=torch.float32, scale_dtype=torch.float32):
        super().__init__()
        if bits not in (3, 4, 8) or in_features % group_size or (bits == 3 and in_features % 8):
            raise ValueError(f"bits must be 3, 4 or 8, group_size must divide {in_features} (int3: a multiple of 8)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        ng = in_features // group_size
        if bits == 4:
            qw = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        elif bits == 3:
            qw = torch.empty(out_features, in_features * 3 // 8, dtype=torch.uint8, device=device)
        else:
            qw = torch.empty(out_features, in_features, dtype=torch.int8 if symmetric else torch.uint8, device=device)
        self.register_buffer("qweight", qw)
        self.register_buffer("weight_scale", torch.empty(out_features, ng, dtype=scale_dtype, device=device))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.empty(out_features, ng, dtype=torch.uint8, device=device))
        else:
            self.weight_zero_point = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, lin: nn.Linear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32) -> "WeightOnlyLinear":
        """Build from integer codes [out, in] (as returned by quant.rtn or GPTQ) and group params
        (scale_dtype float16 only for scales already rounded to fp16: the copy must be exact)."""
        from .integer import QScheme, pack_int3, pack_int4

        sym = zero is None
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size, sym,
                device=lin.weight.device, dtype=lin.weight.dtype, scale_dtype=scale_dtype)
        if bits in (3, 4):
            m.qweight.copy_((pack_int4 if bits == 4 else pack_int3)(codes, QScheme(bits, group_size, sym)))
        else:
            m.qweight.copy_(codes.to(m.qweight.dtype))
        m.weight_scale.copy_(scale)
        if zero is not None:
            m.weight_zero_point.copy_(zero.to(torch.uint8))
        if lin.bias is not None:
            m.bias.data = lin.bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        from .integer import unpack_int3, unpack_int4

        if self.bits == 4:
            return unpack_int4(self.qweight, self.symmetric)
        if self.bits == 3:
            return unpack_int3(self.qweight, self.symmetric)
        return self.qweight.to(torch.int16)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        from .integer import dequantize_groups

        return dequantize_groups(self.codes(), self.weight_scale.float(), self.weight_zero_point, self.group_size).to(dtype)

    _kernel: str | None = None  # set by slimctl.kernels: a fused kernel, its packed weights, its forward
    _fused: dict | None = None
    _fused_forward = None

    def set_kernel(self, kernel: str | None, fused: dict | None, forward=None) -> None:
        self._kernel, self._fused, self._fused_forward = kernel, fused, forward

    _once: dict | None = None  # inside dequantized_once(): the dequantized weight per dtype, made at first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            return self._fused_forward(self, x)
        if self._once is not None:
            w = self._once.get(x.dtype)
            if w is None:
                w = self._once[x.dtype] = self.dequantized(x.dtype)
        else:
            w = self.dequantized(x.dtype)
        y = F.linear(x, w)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"symmetric={self.symmetric}, bias={self.bias is not None}, kernel={self._kernel or 'dequantize'}")

    def meta(self) -> dict[str, Any]:
        spec = {"format": self.FORMAT, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        if self.weight_scale.dtype == torch.float16:
            spec["scale_dtype"] = "float16"
        return spec

    @classmethod
    def from_meta(cls, spec: dict[str, Any], dtype) -> "WeightOnlyLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["bits"], spec["group_size"],
                   spec["symmetric"], dtype=dtype, scale_dtype=getattr(torch, spec.get("scale_dtype", "float32")))


class Int8Embedding(QuantizedLayer):
    """nn.Embedding with int8 rows and a float32 scale per row (symmetric round-to-nearest).

    A lookup reads whole rows, so a scale per row (per token) is both the natural granularity and
    exact to apply after the gather. An encoder's word-embedding table is often half its bytes
    (MiniLM-L6: 47 of 87 MB in fp32), so a small artifact has to shrink it too."""

    FORMAT, STORED, CACHES = "int8-embedding", ("qweight", "weight_scale"), ("dense",)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device=None,
                 dtype=torch.float32, multiplier: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.multiplier = multiplier  # what a scaled lookup multiplies each row by (Gemma: √hidden); the table is stored unscaled
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, 1, dtype=torch.float32, device=device))
        self.out_dtype = dtype  # what the rest of the model computes in (kernels.accelerate may set bf16)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        mult = row_multiplier(emb)
        if mult is None:
            raise ValueError(f"{type(emb).__name__} is not a plain or scaled lookup table")
        q, scale = quantize_rows_int8(emb.weight)
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype,
                multiplier=mult)
        return m._filled(emb, q, scale[:, None])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.weight_scale).to(dtype)

    def weight_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    dense: torch.Tensor | None = None  # kernels.accelerate(batch=True): the table dequantized once, at load

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            rows = F.embedding(ids, self.dense, self.padding_idx)
            return rows * self.multiplier if self.multiplier != 1.0 else rows
        rows = F.embedding(ids, self.qweight).float() * F.embedding(ids, self.weight_scale)
        return (rows * self.multiplier if self.multiplier != 1.0 else rows).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows with a scale per row"

    def meta(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, **({"multiplier": self.multiplier} if self.multiplier != 1.0 else {})}

    @classmethod
    def from_meta(cls, spec: dict[str, Any], dtype) -> "Int8Embedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec.get("padding_idx"), dtype=dtype,
                   multiplier=spec.get("multiplier", 1.0))


def row_multiplier(emb: nn.Module) -> float | None:
    """1.0 for a plain nn.Embedding; the scalar a scaled lookup multiplies its rows by (transformers' Gemma 3
    `…ScaledWordEmbedding`: rows × embed_scale); None for any other subclass, whose forward slimctl cannot know."""
    if type(emb) is nn.Embedding:
        return 1.0
    scale = getattr(emb, "embed_scale", None)
    if isinstance(emb, nn.Embedding) and type(emb).__name__.endswith("ScaledWordEmbedding") and scale is not None:
        return float(scale)
    return None


QUANTIZED_TYPES = (QuantizedLayer,)  # isinstance checks: any quantized layer


def quantized_modules_meta(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What an artifact's slimctl.json records so that `build_from_meta` can rebuild the layers."""
    return {name: m.meta() for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def storage_bits(mod: nn.Module) -> tuple[int, int]:
    """(bits stored for the weight, incl. scales and zero points; weights) of one Linear-like module:
    the numerator and denominator of bits per weight."""
    if isinstance(mod, QuantizedLayer):
        return mod.storage_bits()
    weights = mod.in_features * mod.out_features
    return weights * mod.weight.element_size() * 8, weights


def bits_per_weight(model: nn.Module, names: list[str]) -> float:
    """Average stored bits per weight of the named Linear(-like) modules, scales and zero points included."""
    bits = weights = 0
    for n in names:
        b, w = storage_bits(model.get_submodule(n))
        bits, weights = bits + b, weights + w
    return round(bits / max(weights, 1), 4)


def build_from_meta(model: nn.Module, qmeta: dict[str, dict[str, Any]]) -> None:
    """Swap the named Linear layers of a freshly built skeleton for empty quantized ones."""
    from ..stream.skeleton import set_submodule
    import_module(".fp8", __package__)  # registers Fp8Linear's format

    for name, spec in qmeta.items():
        cls = FORMATS.get(spec.get("format"))
        if cls is None:
            raise ValueError(f"unknown quantized format {spec.get('format')!r} for {name}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"slimctl.json names module {name}, which the model does not have") from None
        new = cls.from_meta(spec, getattr(old, "weight", torch.empty(0)).dtype)
        set_submodule(model, name, new)
