"""The compressed-tensors "pack-quantized" layout for weight-only int4/int8 artifacts.

This is the layout vLLM serves and that `transformers` loads when compressed-tensors is installed:
per quantized Linear `weight_packed` (int32, codes + 2^(b-1) packed densely along the input
dimension, element i at bit i*b), `weight_scale` [out, groups], `weight_shape`, and for asymmetric
schemes `weight_zero_point` packed along the output dimension; `config.json` carries a
`quantization_config` whose config groups name each layer. slimctl writes and reads it with its
own code, so saving needs no extra package.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..quant.layers import WeightOnlyLinear

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
ROWS_PER_CHUNK = 1024  # (un)packing widens to int64, 8 codes per word: a 70B-sized layer in one go is gigabytes


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed integer codes [rows, cols] -> int32 words along `dim`, as compressed-tensors packs them
    (row chunks along dim 1: the int64 intermediates of a whole 70B-sized layer are gigabytes)."""
    if dim == 1 and codes.shape[0] > ROWS_PER_CHUNK:
        return torch.cat([_pack(codes[r:r + ROWS_PER_CHUNK], bits, 1) for r in range(0, codes.shape[0], ROWS_PER_CHUNK)])
    return _pack(codes, bits, dim)


def _bitstream(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] -> [rows, cols·bits] bits, each code's lowest bit first."""
    return ((v.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int64)) & 1).reshape(v.shape[0], -1)


def _pack_dense(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths that do not divide 32 (int3): compressed-tensors packs densely, a code may straddle two words."""
    stream = _bitstream(v, bits)
    stream = torch.nn.functional.pad(stream, (0, -stream.shape[1] % 32)).reshape(v.shape[0], -1, 32)
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_dense(w: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    stream = ((w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    stream = stream.reshape(w.shape[0], -1)[:, : cols * bits].reshape(w.shape[0], cols, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    if 32 % bits:
        words = _pack_dense(v, bits)
        return words.T.contiguous() if dim == 0 else words
    rows, cols = v.shape
    per = 32 // bits  # 4 and 8 bits fill words exactly
    padded = math.ceil(cols / per) * per
    if padded > cols:
        v = torch.nn.functional.pad(v, (0, padded - cols))
    v = v.reshape(rows, padded // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.T.contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> signed integer codes of `shape` (row chunks along dim 1)."""
    if dim == 1 and words.shape[0] > ROWS_PER_CHUNK:
        return torch.cat([_unpack(words[r:r + ROWS_PER_CHUNK], bits, (min(ROWS_PER_CHUNK, shape[0] - r), shape[1]), 1)
                          for r in range(0, words.shape[0], ROWS_PER_CHUNK)])
    return _unpack(words, bits, shape, dim)


def _unpack(words: torch.Tensor, bits: int, shape: tuple[int, int], dim: int) -> torch.Tensor:
    w = words.T if dim == 0 else words
    rows = w.shape[0]
    cols = shape[0] if dim == 0 else shape[1]
    if 32 % bits:
        v = _unpack_dense(w, bits, cols) - (1 << (bits - 1))
        return (v.T if dim == 0 else v).to(torch.int16).contiguous()
    per = 32 // bits
    v = (w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (torch.arange(per, dtype=torch.int64) * bits)
    v = (v & ((1 << bits) - 1)).reshape(rows, -1) - (1 << (bits - 1))
    cols = shape[0] if dim == 0 else shape[1]
    v = v[:, :cols]
    return (v.T if dim == 0 else v).to(torch.int16).contiguous()


def _scheme(m: WeightOnlyLinear) -> dict[str, Any]:
    per_channel = m.group_size >= m.in_features
    return {"num_bits": m.bits, "type": "int", "symmetric": m.symmetric,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else m.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {},
            **({"scale_dtype": "torch.float16"} if m.weight_scale.dtype == torch.float16 else {})}


def exportable(model) -> bool:
    """Whether every quantized layer fits the layout as transformers loads it today.

    Asymmetric schemes are left out: compressed-tensors 0.19 packs their zero points along the
    output dimension, while transformers 5.24 registers them unpacked and refuses the file, so such
    an artifact would load nowhere but in slimctl. They keep slimctl's own layout instead."""
    from ..families.convert import PREPARED
    from ..quant.layers import QUANTIZED_TYPES

    if getattr(model, PREPARED, None):  # Conv1D or fused experts unfused by slimctl: transformers' layout differs
        return False
    mods = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    others = [m for m in model.modules() if isinstance(m, QUANTIZED_TYPES) and not isinstance(m, WeightOnlyLinear)]
    return bool(mods) and all(m.symmetric for m in mods) and not others  # e.g. int8 embeddings: slimctl's layout


def quantization_config(model) -> dict[str, Any] | None:
    """config.json's quantization_config: one config group per distinct scheme, naming its layers."""
    groups: dict[str, dict[str, Any]] = {}
    quantized = set()
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyLinear):
            key = json.dumps(_scheme(m), sort_keys=True)
            groups.setdefault(key, {"targets": [], "weights": _scheme(m), "input_activations": None,
                                    "output_activations": None, "format": None})["targets"].append(name)
            quantized.add(name)
    if not groups:
        return None
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def pack_module(state: dict[str, torch.Tensor], name: str, m: WeightOnlyLinear) -> None:
    """Replace module `name`'s slimctl buffers in `state` by its pack-quantized tensors."""
    for k in ("qweight", "weight_scale", "weight_zero_point"):
        state.pop(f"{name}.{k}", None)
    codes = m.codes()
    if not m.symmetric:  # slimctl keeps unsigned codes and zeros; compressed-tensors signed ones
        codes = codes - (1 << (m.bits - 1))
        zp = m.weight_zero_point.to(torch.int16) - (1 << (m.bits - 1))
        state[f"{name}.weight_zero_point"] = pack_int32(zp, m.bits, dim=0)
    state[f"{name}.weight_packed"] = pack_int32(codes, m.bits)
    state[f"{name}.weight_scale"] = m.weight_scale.detach().clone()
    state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)


def rewrite_folder(model, folder: Path) -> None:
    """Turn the slimctl buffers that save_pretrained wrote into the pack-quantized layout, in place."""
    if not exportable(model):
        return
    qcfg = quantization_config(model)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError("compressed-tensors export expects a single safetensors file")
    state = load_file(files[0])
    meta = {"format": "pt"}
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyLinear):
            pack_module(state, name, m)
    save_file(state, str(files[0]), metadata=meta)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def to_slimctl_state(state: dict[str, torch.Tensor], qmeta: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of an artifact -> the buffers of slimctl's WeightOnlyLinear."""
    from ..quant.integer import QScheme, pack_int3, pack_int4

    out = dict(state)
    for name, spec in qmeta.items():
        if spec.get("format") != "weight-only" or f"{name}.weight_packed" not in state:
            continue
        bits, sym = spec["bits"], spec["symmetric"]
        shape = (spec["out_features"], spec["in_features"])
        codes = unpack_int32(out.pop(f"{name}.weight_packed"), bits, shape)
        out.pop(f"{name}.weight_shape", None)
        if not sym:
            codes = codes + (1 << (bits - 1))
            ng = spec["in_features"] // spec["group_size"]
            zp = unpack_int32(out.pop(f"{name}.weight_zero_point"), bits, (spec["out_features"], ng), dim=0)
            out[f"{name}.weight_zero_point"] = (zp + (1 << (bits - 1))).to(torch.uint8)
        if bits in (3, 4):
            out[f"{name}.qweight"] = (pack_int4 if bits == 4 else pack_int3)(codes, QScheme(bits, spec["group_size"], sym))
        else:
            out[f"{name}.qweight"] = codes.to(torch.int8 if sym else torch.uint8)
    return out
