"""Quantized layers that slimctl writes into artifacts, and the code that rebuilds them on reload.

Weights are stored as real int8 tensors (`qweight`, one row per output channel) with a float32
scale per row (`weight_scale`); nothing here is fake-quantized floats.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel round-to-nearest: w ≈ q * scale[:, None], q in [-127, 127]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights.

    act="none": weight-only; the weight is dequantized to the activation dtype for the matmul.
    act="dynamic": activations are quantized per token (symmetric int8) at run time and multiplied
    with torch._int_mm (int8 x int8 -> int32). Per-token scales keep each sample's result
    independent of the rest of the batch, unlike per-tensor dynamic quantization.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, act: str = "none",
                 device=None, dtype=torch.float32):
        super().__init__()
        if act not in ("none", "dynamic"):
            raise ValueError(f"act must be 'none' or 'dynamic', not {act!r}")
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._qweight_t: torch.Tensor | None = None  # cache of the transposed weight for _int_mm

    @classmethod
    def from_linear(cls, lin: nn.Linear, act: str) -> "Int8Linear":
        q, scale = quantize_rows_int8(lin.weight)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, device=lin.weight.device, dtype=lin.weight.dtype)
        m.qweight.copy_(q)
        m.weight_scale.copy_(scale)
        if lin.bias is not None:
            m.bias.data = lin.bias.detach().clone()
        return m

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "dynamic" and x.device.type == "cpu":
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

    def _apply(self, fn, recurse=True):  # .to()/.cuda() must drop the cached transpose
        self._qweight_t = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.act}, bias={self.bias is not None}"

    def meta(self) -> dict[str, Any]:
        return {"format": "int8", "act": self.act, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}


FORMATS = {"int8": Int8Linear}


def quantized_modules_meta(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What an artifact's slimctl.json records so that `build_from_meta` can rebuild the layers."""
    return {name: m.meta() for name, m in model.named_modules() if isinstance(m, tuple(FORMATS.values()))}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_from_meta(model: nn.Module, qmeta: dict[str, dict[str, Any]]) -> None:
    """Swap the named Linear layers of a freshly built skeleton for empty quantized ones."""
    for name, spec in qmeta.items():
        cls = FORMATS.get(spec.get("format"))
        if cls is None:
            raise ValueError(f"unknown quantized format {spec.get('format')!r} for {name}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"slimctl.json names module {name}, which the model does not have") from None
        new = cls(spec["in_features"], spec["out_features"], spec["bias"], spec.get("act", "none"),
                  dtype=getattr(old, "weight", torch.empty(0)).dtype)
        set_submodule(model, name, new)
