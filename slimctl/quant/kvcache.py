"""A quantized KV cache for slimctl's torch decode and eval paths: int4 codes in blocks of 32 with one fp16 scale
per block (the bytes of llama.cpp's q4_0 KV cache type, 0.5625 per value), int8 in blocks of 64 where the head
size allows (1.03 bytes; llama.cpp's q8_0 takes blocks of 32, 1.0625), keys
per channel over groups of 32 tokens and values per token after a Hadamard rotation (see QuantizedKVLayer),
int4 keys asymmetric (fp16 scale and minimum, as KIVI quantizes keys) over groups of 64 tokens, the same 0.5625
bytes per value; appended without re-quantizing what is stored, dequantized per layer when attention reads it. A transformers
`Cache`, so any causal LM that takes a cache argument uses it."""
from __future__ import annotations

import inspect
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import UnsupportedError

KVCache = Literal["fp", "int8", "int4"]
BLOCK = 32  # int4 (q4_0's block); int8 takes 64 where the head size allows: 1.03 bytes per value, 1.94x under fp16


def block(bits: int, head_dim: int) -> int:
    return 64 if bits == 8 and head_dim % 64 == 0 else BLOCK
SINK_TOKENS = 1  # kept in the model's dtype (measured: the first token's keys are what int4 rounds worst)
LLAMA_CPP = {"fp": "f16", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's names for the same layouts (`--kv-type`)


def normalise(name: str) -> str:
    from ..specs import KV_NAMES  # the names eval/bench specs accept, and what each means

    if name not in KV_NAMES:
        raise UnsupportedError(f"unknown KV cache type '{name}'; use fp, int8 or int4 (llama.cpp names: f16, q8_0, q4_0)")
    return KV_NAMES[name]


def quantize(x: torch.Tensor, bits: int, size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (codes, fp16 scales [..., D/32]). int8: d = amax/127 (q8_0); int4: d = v/−8 with v the
    element of largest magnitude (q4_0), codes −8..7 packed two per byte, low nibble first."""
    g = x.float().unflatten(-1, (-1, size))
    if bits == 8:
        d = (g.abs().amax(-1, keepdim=True) / 127).half()
        q = torch.round(g / d.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
        return q.flatten(-2), d.squeeze(-1)
    idx = g.abs().argmax(-1, keepdim=True)
    d = (g.gather(-1, idx) / -8).half()
    q = (torch.round(g / d.float().where(d != 0, 1e-30)) + 8).clamp(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), d.squeeze(-1)


KEY_GROUP_INT4 = 64  # int4 keys: tokens per (scale, minimum) pair, 0.5 + 4/64 bytes per value (q4_0's 0.5625)


def quantize_asym(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., D] -> 4-bit codes 0..15 packed two per byte, fp16 scales and fp16 minima per block of `size`
    (q4_1-style: x ≈ code · d + m, d = (max − min)/15)."""
    g = x.float().unflatten(-1, (-1, size))
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    m, d = lo.half(), ((hi - lo) / 15).half()
    q = torch.round((g - m.float()) / d.float().clamp_min(1e-30)).clamp(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), d.squeeze(-1), m.squeeze(-1)


def dequantize_asym(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype: torch.dtype, size: int) -> torch.Tensor:
    q = torch.stack([q & 15, q >> 4], -1).flatten(-2)
    x = q.float().unflatten(-1, (-1, size)) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def dequantize(q: torch.Tensor, d: torch.Tensor, bits: int, dtype: torch.dtype, size: int = BLOCK) -> torch.Tensor:
    if bits == 4:
        q = torch.stack([(q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8], -1).flatten(-2)
    x = q.float().unflatten(-1, (-1, size)) * d.float().unsqueeze(-1)
    return x.flatten(-2).to(dtype)


class QuantizedKVLayer(DynamicLayer):
    """One layer's keys and values, quantized as the measurements on smollm2-135m favoured (docs/results/lowbit.md):

    - the first token (the attention sink, whose key carries the largest values) stays in the model's dtype,
      as IntactKV and KVQuant keep it;
    - keys are quantized per channel (KIVI: key outliers sit in fixed channels), int4 asymmetrically (scale and
      minimum, as KIVI does) over groups of 64 tokens, int8 symmetrically over 64 (32 where the head size is not a
      multiple of 64), so up to 63 newest keys wait in the model's dtype until their group is full;
    - values are quantized per token in blocks of 32 (64) along the head, after a randomised Hadamard rotation of each
      head (QuaRot's online rotation, undone on reading: exact but for the rounding, which it spreads).

    `update` appends the new tokens (what is stored is never re-quantized) and returns all of them dequantized, a
    temporary the attention reads and frees after the layer."""

    is_croppable = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.length = 0
        self._k = self._v = None  # (codes, scales): keys [B, H, D, T'] per channel; values [B, H, T', D] rotated
        self._sk = self._sv = self._pk = None  # sink key/value, keys waiting for a full group
        self._h = None

    def lazy_initialization(self, key_states, value_states) -> None:
        from .hadamard import rotation

        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self._h = rotation(value_states.shape[-1], "hadamard", 0)[0].to(torch.float32).to(value_states.device)
        self.size = block(self.bits, value_states.shape[-1])
        self.key_size = KEY_GROUP_INT4 if self.bits == 4 else self.size
        self._sk, self._sv = key_states[..., :0, :], value_states[..., :0, :]
        self._pk = key_states[..., :0, :]

    @staticmethod
    def _append(stored, parts: tuple, dim: int):
        return parts if stored is None else tuple(torch.cat([a, b], dim) for a, b in zip(stored, parts))

    def _quantize_keys(self, k: torch.Tensor) -> tuple:  # [..., D, T] per channel along the tokens
        return quantize_asym(k, self.key_size) if self.bits == 4 else quantize(k, self.bits, self.key_size)

    def _keys(self) -> torch.Tensor:
        if self.bits == 4:
            return dequantize_asym(*self._k, self.dtype, self.key_size)
        return dequantize(*self._k, self.bits, self.dtype, self.key_size)

    def _store(self, key_states, value_states) -> None:
        take = max(0, SINK_TOKENS - self._sk.shape[-2])
        if take:
            self._sk = torch.cat([self._sk, key_states[..., :take, :]], -2)
            self._sv = torch.cat([self._sv, value_states[..., :take, :]], -2)
            key_states, value_states = key_states[..., take:, :], value_states[..., take:, :]
        if value_states.shape[-2]:
            self._v = self._append(self._v, quantize(value_states.float() @ self._h, self.bits, self.size), -2)
        self._pk = torch.cat([self._pk, key_states], -2)
        full = self._pk.shape[-2] - self._pk.shape[-2] % self.key_size
        if full:
            self._k = self._append(self._k, self._quantize_keys(self._pk[..., :full, :].transpose(-1, -2)), -1)
            self._pk = self._pk[..., full:, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store(key_states, value_states)
        self.length += key_states.shape[-2]
        keys = [self._sk] + ([self._keys().transpose(-1, -2)] if self._k else []) + [self._pk]
        values = [self._sv] + ([(dequantize(*self._v, self.bits, torch.float32, self.size) @ self._h.T).to(self.dtype)]
                               if self._v else [])
        return torch.cat(keys, -2), torch.cat(values, -2)

    def get_seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        held = [t for pair in (self._k, self._v) if pair for t in pair] + [t for t in (self._sk, self._sv, self._pk) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def reset(self) -> None:
        self._k = self._v = self._sk = self._sv = self._pk = None
        self.length = 0
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pick = lambda t: t.index_select(0, beam_idx.to(t.device))  # noqa: E731
        if self._k is not None:
            self._k = tuple(map(pick, self._k))
        if self._v is not None:
            self._v = tuple(map(pick, self._v))
        if self._sk is not None:
            self._sk, self._sv, self._pk = pick(self._sk), pick(self._sv), pick(self._pk)


class QuantizedKVCache(Cache):
    """A dynamic cache whose every layer is a QuantizedKVLayer (full-attention decoders only)."""

    def __init__(self, config, kind: str):
        from transformers.cache_utils import get_layer_types_and_kwargs

        kind = normalise(kind)
        if kind == "fp":
            raise ValueError("QuantizedKVCache is for int8/int4; fp is transformers' DynamicCache")
        text = config.get_text_config(decoder=True)
        types, _ = get_layer_types_and_kwargs(text)
        odd = sorted(set(types) - {"full_attention"})
        if odd:
            raise UnsupportedError(f"a quantized KV cache handles full-attention layers only; this model has {', '.join(odd)} "
                                   "layers (sliding-window or chunked attention): use kv_cache fp")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head_dim % BLOCK:
            raise UnsupportedError(f"a quantized KV cache stores blocks of {BLOCK} along the head size; head_dim {head_dim} "
                                   "is not a multiple of it")
        self.kind, self.bits = kind, 8 if kind == "int8" else 4
        super().__init__(layers=[QuantizedKVLayer(self.bits) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def cache_arg(model) -> str:
    """The keyword a model's forward takes its cache under (renamed in transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    """The cache a forward returned (`cache` or, before the rename, `past_key_values`)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def per_request(model, kind: str):
    """A function giving the keyword arguments of one request's (or one eval window's) first forward: a fresh
    quantized cache for a torch model, nothing for fp. A GGUF run by llama.cpp takes the type when its context
    is made, so it is set here once. An unsupported layout is refused here, before any timing or window."""
    kind = normalise(kind)
    if kind == "fp":
        return lambda: {}
    if getattr(model, "artifact_format", None) == "gguf":
        model.set_kv_cache(kind)
        return lambda: {}
    QuantizedKVCache(model.config, kind)
    arg = cache_arg(model)
    return lambda: {arg: QuantizedKVCache(model.config, kind)}


def bytes_per_token(config, kind: str, fp_bytes: int, llama_cpp: bool = False) -> float:
    """KV bytes one token takes over all layers: 2 (K, V) x layers x kv heads x head_dim x bytes per value (fp: the
    model's dtype; int8: 1 + 2/64, or 1 + 2/32 where the head size is not a multiple of 64 and in llama.cpp's q8_0;
    int4: 0.5 + 2/32, values q4_0 and keys 0.5 + 4/64 with a minimum, the same), the first token and keys still waiting for their group aside."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kind = normalise(kind)
    size = BLOCK if llama_cpp else block(8 if kind == "int8" else 4, head_dim)
    per = fp_bytes if kind == "fp" else (1 if kind == "int8" else 0.5) + 2 / size
    return 2 * text.num_hidden_layers * kv * head_dim * per
