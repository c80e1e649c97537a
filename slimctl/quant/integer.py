"""Integer quantization math shared by the techniques: group parameters, rounding, int4 packing.

Conventions (also those of compressed-tensors' pack-quantized format):
- a weight W [out, in] is split along `in` into groups of `group_size` columns; each row and group
  has a scale (and, when asymmetric, an integer zero point);
- symmetric: q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1), w ≈ q * s, s = max|w| / (2^(b-1) - 1) (`absmax`);
  `signed` takes llama.cpp Q4_0's rule s = w_ext / -2^(b-1), w_ext the entry of largest magnitude with its
  sign, so it lands on the grid's extra negative level and the step is 2^(b-1) / (2^(b-1) - 1) finer (the
  scale is negative when w_ext > 0); `mse` searches shrunk absmax and signed scales for the least squared
  rounding error of each group (GPTQ's reference quantizer's grid search, llama.cpp's make_qx_quants);
- asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1), w ≈ (q - z) * s, s = (max - min) / (2^b - 1);
- int4 codes are stored two per byte (column 2k in the low nibble, 2k+1 in the high nibble) as the
  unsigned code q + 8 (symmetric) or q (asymmetric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UnsupportedError


ScaleSearch = Literal["absmax", "signed", "mse"]  # how a group's scale is chosen (module docstring)


@dataclass(frozen=True)
class QScheme:
    bits: int = 4  # 4 or 8
    group_size: int | None = 128  # None: one group per row (per output channel)
    symmetric: bool = True
    fp16_scales: bool = False  # scales rounded to fp16 before the codes are chosen (GGUF stores fp16 scales)
    scale_search: ScaleSearch = "absmax"

    @property
    def scale_dtype(self) -> torch.dtype:
        """What the saved artifact stores the scales in: fp16-rounded scales take 16 bits, not 32."""
        return torch.float16 if self.fp16_scales else torch.float32

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def resolve_group(in_features: int, group_size: int | None) -> int:
    """The group actually used for a layer of this width: the requested one when it divides the
    width, else the largest power of two below it that does (576 with 128 -> 64)."""
    if group_size is None or group_size >= in_features:
        return in_features
    if in_features % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)
    while g > 1 and in_features % g:
        g //= 2
    return g


def group_params(w: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of `w` [rows, cols], taken over all its columns."""
    w = w.float()
    if scheme.scale_search == "mse":
        return _mse_params(w, scheme)
    if scheme.symmetric:
        return _symmetric_scale(w, scheme, scheme.scale_search == "signed"), None
    return _asymmetric_params(w, scheme)


def _symmetric_scale(w: torch.Tensor, scheme: QScheme, signed: bool, shrink: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's scale [rows], or [S, rows] for S `shrink` factors [S, 1]: max|w| / qmax (divided, as before
    scale_search existed, so absmax artifacts stay bit-identical), or the signed extreme / qmin."""
    if signed:
        ext = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        scale = torch.where(ext.abs() < 1e-12, torch.full_like(ext, 1e-12), ext) / scheme.qmin
    else:
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / scheme.qmax
    scale = scale if shrink is None else scale * shrink
    return fp16_rounded(scale) if scheme.fp16_scales else scale


def _asymmetric_params(w: torch.Tensor, scheme: QScheme, shrink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's scale and zero point [rows], or [S, rows] with the range shrunk by S `shrink` factors [S, 1]."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale = ((hi - lo) / scheme.qmax).clamp(min=1e-12)
    if scheme.fp16_scales:
        scale = fp16_rounded(scale)
    zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
    return scale, zero


MSE_SHRINKS = tuple(1.0 - 0.01 * i for i in range(26))  # 1.00 … 0.75: the clipping levels `mse` tries
MSE_CHUNK = 1 << 19  # candidate × row × column elements scored at once: 2 MB of float32 stays in cache (20x faster than 64 MB)


def _mse_params(w: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, the candidate scale (and zero) whose rounding leaves the least squared error: the absmax and
    signed scales (symmetric) or the min/max range (asymmetric), each shrunk by every MSE_SHRINKS factor. All
    candidates of a chunk of rows are scored in one pass; ties go to the earlier candidate (absmax, unshrunk)."""
    kinds = 2 if scheme.symmetric else 1
    rows_at_once = max(1, MSE_CHUNK // (kinds * len(MSE_SHRINKS) * max(w.shape[1], 1)))
    parts = [_mse_chunk(w[r:r + rows_at_once], scheme) for r in range(0, w.shape[0], rows_at_once)]
    scale = torch.cat([p[0] for p in parts])
    return scale, (None if scheme.symmetric else torch.cat([p[1] for p in parts]))


def _mse_chunk(w: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    shrink = torch.tensor(MSE_SHRINKS)[:, None]  # [S, 1] against [1, rows]
    if scheme.symmetric:  # candidates [2S, rows]: absmax shrunk, then signed shrunk
        scale, zero = torch.cat([_symmetric_scale(w, scheme, signed, shrink) for signed in (False, True)]), None
    else:
        scale, zero = _asymmetric_params(w, scheme, shrink)
    s = scale[..., None]
    q = torch.round(w[None] / s)
    if zero is not None:
        q += zero[..., None]
    q.clamp_(scheme.qmin, scheme.qmax)
    if zero is not None:
        q -= zero[..., None]
    err = q.mul_(s).sub_(w[None]).pow_(2).sum(-1)  # [candidates, rows]
    best = err.argmin(dim=0, keepdim=True)
    return scale.gather(0, best).squeeze(0), (zero.gather(0, best).squeeze(0) if zero is not None else None)


def fp16_rounded(scale: torch.Tensor) -> torch.Tensor:
    """The scale as fp16 stores it (kept in float32): rounded to nearest, never to zero or infinity, sign kept."""
    h = scale.abs().clamp(max=65504.0).half().float()
    h = torch.where(h > 0, h, torch.full_like(h, 2.0 ** -24))
    return torch.where(scale < 0, -h, h)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme) -> torch.Tensor:
    """Integer codes of `w` [rows, cols] given per-row scale/zero (broadcast over columns)."""
    q = torch.round(w.float() / scale[:, None])
    if zero is not None:
        q = q + zero[:, None]
    return q.clamp_(scheme.qmin, scheme.qmax)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    q = q.float()
    if zero is not None:
        q = q - zero[:, None]
    return q * scale[:, None]


def rtn(w: torch.Tensor, scheme: QScheme, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of W [out, in] with groups of `group` columns.

    Returns integer codes [out, in] (float tensor of whole numbers), scales [out, in/group] and
    zero points [out, in/group] or None."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f * (in_f // group), group)
    scale, zero = group_params(wg, scheme)
    q = quantize_with(wg, scale, zero, scheme).reshape(out_f, in_f)
    scale = scale.reshape(out_f, in_f // group)
    return q, scale, (zero.reshape(out_f, in_f // group) if zero is not None else None)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    s = scale.float().repeat_interleave(group, dim=1)
    if zero is not None:
        return (q.float() - zero.float().repeat_interleave(group, dim=1)) * s
    return q.float() * s


def pack_int4(codes: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """[out, in] integer codes -> [out, in/2] uint8, two unsigned 4-bit codes per byte."""
    if codes.shape[1] % 2:
        raise UnsupportedError(f"int4 packing needs an even input width, got {codes.shape[1]}")
    u = (codes + (8 if scheme.symmetric else 0)).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, symmetric: bool) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    u = torch.stack((lo, hi), dim=2).reshape(packed.shape[0], packed.shape[1] * 2)
    return u - 8 if symmetric else u


def pack_int3(codes: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """[out, in] integer codes -> [out, 3·in/8] uint8: eight unsigned 3-bit codes in three bytes, the first
    code in the lowest bits (little-endian 24-bit words): 3.0 bits per weight as stored."""
    if codes.shape[1] % 8:
        raise UnsupportedError(f"int3 packing needs an input width that is a multiple of 8, got {codes.shape[1]}")
    u = (codes + (4 if scheme.symmetric else 0)).to(torch.int32).view(codes.shape[0], -1, 8)
    word = (u << (torch.arange(8, dtype=torch.int32) * 3)).sum(-1)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).to(torch.uint8).view(codes.shape[0], -1)


def unpack_int3(packed: torch.Tensor, symmetric: bool) -> torch.Tensor:
    b = packed.to(torch.int32).view(packed.shape[0], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = ((word[..., None] >> (torch.arange(8, dtype=torch.int32) * 3)) & 7).view(packed.shape[0], -1).to(torch.int16)
    return u - 4 if symmetric else u
