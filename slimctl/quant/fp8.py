"""FP8 (e4m3) weight and activation quantization: per-row scales, the capability check, and Fp8Linear, which
multiplies with torch._scaled_mm on GPUs that have FP8 and dequantizes elsewhere."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import QuantizedLayer

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per output channel, or per token) e4m3 with a float32 scale: x ≈ q * scale[:, None]."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_supported(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(True, "") where FP8 matmuls run natively (CUDA compute capability >= 8.9), else (False, why)."""
    if not torch.cuda.is_available():
        return False, "this machine has no CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}"
    return True, ""


class Fp8Linear(QuantizedLayer):
    """nn.Linear with e4m3 weights (a float32 scale per output channel) and e4m3 activations scaled
    per token at run time, multiplied with torch._scaled_mm on GPUs with native FP8 (compute
    capability >= 8.9). Elsewhere the same quantized values are dequantized and multiplied in
    float32: numerically the same scheme, for tests and reloads, not for speed."""

    FORMAT, STORED = "fp8", ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Fp8Linear":
        q, scale = fp8_rows(lin.weight.detach())
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
        return m._filled(lin, q, scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = fp8_rows(x2)
        if x.is_cuda and fp8_supported(x.device)[0] and x2.shape[0] % 16 == 0 and self.in_features % 16 == 0 \
                and self.out_features % 16 == 0:
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(), out_dtype=out_dtype)
        else:
            y = (xq.float() * xs) @ self.dequantized(torch.float32).t()
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, e4m3 weights per channel, dynamic per-token activations"

    def meta(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_meta(cls, spec: dict[str, Any], dtype) -> "Fp8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], dtype=dtype)
