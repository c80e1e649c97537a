"""GGUF export for llama.cpp: a slimctl artifact of a decoder whose family file names a llama.cpp
architecture (`gguf_arch`), written as one .gguf file with the keys llama.cpp's converter writes for it.

Weight-only int4/int8 layers are **packed from slimctl's integer codes, never re-quantized**:
symmetric int4 with a scale per group of a multiple of 32 input columns is exactly Q4_0
(x = d·(q − 8), element j of a 32-block in the low nibble of byte j, element j+16 in its high nibble),
and symmetric int8 likewise exactly Q8_0 (x = d·q), provided the scales are fp16 numbers (the
`fp16_scales: true` option of rtn/gptq). A group of 64 or 128 repeats its scale over its 32-blocks.
What cannot be exact (asymmetric zero points, scales that are not fp16, groups that are not a multiple
of 32) is refused, or with `requantize=True` quantized again by gguf's reference Q4_0/Q8_0 with a note.
Norms are written F32; float Linear layers F16 (or as asked); the token embedding Q8_0 by default, as
llama.cpp does. llama.cpp's RoPE expects q_proj/k_proj rows permuted per head; codes and scales are
permuted alike (groups run along the input dimension, so they stay whole)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import OutputError, UnsupportedError

ROPE_PERMUTED = ("llama", "granite", "deci")  # archs whose RoPE pairs rows (i, i + d/2) llama.cpp-style: q/k rows permuted per head
# llama.cpp's architecture that builds each layer with its own FFN width (an n_ff array), for a family's usual one: 'deci'
# (DeciLM / Nemotron-NAS) is Llama's layer with per-layer sizes, so per-layer FFN widths of a Llama-layout model fit it
PER_LAYER_FFN = {"llama": "deci"}
BLOCK = 32  # Q4_0 and Q8_0 block size


@dataclass
class GGUFOptions:
    embeddings: Literal["q8_0", "f16", "f32"] = "q8_0"  # token embedding (and an untied float LM head)
    float_type: Literal["f16", "f32", "bf16"] = "f16"  # float Linear layers (a float model: every one)
    requantize: bool = False  # quantize again what cannot be packed exactly, with a note, instead of refusing


@dataclass
class ExportResult:
    path: str
    bytes: int
    tensors: dict[str, str]  # gguf tensor name -> type written
    exact_layers: int = 0  # quantized layers packed from their codes
    requantized: list[str] = field(default_factory=list)  # layers quantized again (requantize=True)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each type were written."""
        from collections import Counter

        return dict(sorted(Counter(self.tensors.values()).items()))


# --- packing ---------------------------------------------------------------------------------------

def _block_scales(scale: np.ndarray, group: int, in_features: int) -> np.ndarray:
    """[rows, in/group] scales -> [rows, in/32], each group's scale repeated over its 32-blocks."""
    return np.repeat(scale, group // BLOCK, axis=1)[:, : in_features // BLOCK]


def _fp16_exact(scale: np.ndarray) -> bool:
    return bool(np.array_equal(scale.astype(np.float16).astype(np.float32), scale.astype(np.float32)))


def pack_q4_0(codes: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """Symmetric int4 codes [rows, in] in [-8, 7] and scales [rows, in/group] -> Q4_0 bytes [rows, in/32·18]."""
    rows, cols = codes.shape
    d = _block_scales(scale, group, cols).astype(np.float16).view(np.uint8).reshape(rows, cols // BLOCK, 2)
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def pack_q8_0(codes: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """Symmetric int8 codes [rows, in] and scales [rows, in/group] -> Q8_0 bytes [rows, in/32·34]."""
    rows, cols = codes.shape
    d = _block_scales(scale, group, cols).astype(np.float16).view(np.uint8).reshape(rows, cols // BLOCK, 2)
    q = codes.astype(np.int8).view(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj/k_proj rows in the order llama.cpp's RoPE expects: within each head, the two halves of
    the rotary pairs interleaved. Works on weights, codes and per-row scales alike (rows are permuted)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def exact_reason(layer) -> str | None:
    """Why a WeightOnlyLinear cannot be packed exactly into Q4_0/Q8_0, or None when it can."""
    if not layer.symmetric:
        return "asymmetric zero points (Q4_0/Q8_0 are symmetric)"
    if layer.group_size % BLOCK or layer.in_features % BLOCK:
        return f"group {layer.group_size} / width {layer.in_features} is not a multiple of 32"
    if not _fp16_exact(layer.weight_scale.detach().float().numpy()):
        return "scales are not fp16 numbers (quantize with fp16_scales: true)"
    return None


# --- the model -------------------------------------------------------------------------------------

def hparam(config, *keys, default=None):
    """The first of `keys` the config sets (families name the same size differently: n_embd, hidden_size)."""
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


def rope_parameters(config) -> dict:
    """The RoPE parameters of full-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _config_metadata(writer, config, n_vocab: int, fam) -> None:
    """The keys llama.cpp's converter writes for every family, then the family's own (its gguf_meta)."""
    from ..families import head_counts

    n_head, n_kv, head_dim = head_counts(config)
    n_embd = hparam(config, "hidden_size", "n_embd")
    writer.add_context_length(hparam(config, "max_position_embeddings", "n_positions"))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(hparam(config, "num_hidden_layers", "n_layer"))
    widths = per_layer_widths(config, fam)
    writer.add_feed_forward_length(widths or hparam(config, "intermediate_size", "n_inner", default=4 * n_embd))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    else:
        writer.add_layer_norm_eps(float(hparam(config, "layer_norm_eps", "layer_norm_epsilon")))
    rope = rope_parameters(config)
    if rope or getattr(config, "rope_theta", None):
        every = getattr(config, "rope_parameters", None) or {}
        for params in [v for v in every.values() if isinstance(v, dict)] or [every]:  # one set, or one per layer type
            if params.get("rope_type") not in (None, "default"):
                raise UnsupportedError(f"RoPE scaling '{params['rope_type']}' is not exported to GGUF by slimctl yet")
        writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0))
        partial = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        writer.add_rope_dimension_count(int(head_dim * partial))
    writer.add_vocab_size(n_vocab)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if fam.gguf_meta is not None:
        fam.gguf_meta(writer, config)


def _tensors(model, config, opts: GGUFOptions, res: ExportResult):
    """(gguf name, data, raw type or None) for every tensor: q/k rows permuted where the arch wants it, each
    layer's experts (one Linear each in slimctl) stacked into the 3-D tensor llama.cpp reads (ffn_*_exps)."""
    n_experts = hparam(config, "num_local_experts", "num_experts")
    pending: dict[str, dict[int, tuple]] = {}
    for name, data, raw, expert in _each_tensor(model, config, opts, res):
        if expert is None:
            yield name, data, raw
            continue
        got = pending.setdefault(name, {})
        got[expert] = (data, raw)
        if len(got) == n_experts:
            parts = [got.pop(e) for e in range(n_experts)]
            yield name, np.stack([d for d, _ in parts]), parts[0][1]
            del pending[name]
    if pending:
        raise UnsupportedError(f"experts of {', '.join(pending)} are incomplete; cannot stack them for GGUF")


_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(.*)")


def _each_tensor(model, config, opts: GGUFOptions, res: ExportResult):
    """(gguf name, data, raw type or None, expert index or None) per tensor of the model."""
    import gguf
    import torch

    from .. import families
    from ..quant.layers import Int8Embedding, WeightOnlyLinear

    arch = check_architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hparam(config, "num_hidden_layers", "n_layer"))
    n_head, n_kv, _ = families.head_counts(config)
    permuted = arch in ROPE_PERMUTED
    shift = families.of(config).norm_offset  # Gemma's norms compute x̂ · (1 + w): llama.cpp stores 1 + w
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for a tied head
        mod_name, _, leaf = key.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(mod, Int8Embedding):  # int8 rows with a float32 scale each: written as a float table is
            if leaf != "qweight":
                continue
            key, leaf, value = f"{mod_name}.weight", "weight", mod.dequantized(torch.float32)
        if isinstance(mod, WeightOnlyLinear) and leaf not in ("qweight", "bias"):
            continue  # weight_scale / zero points: written with the codes
        if isinstance(mod, WeightOnlyLinear) and leaf == "bias" and permuted:
            raise UnsupportedError(f"{mod_name} has a bias, which the {arch} architecture in GGUF does not hold")
        quantized = isinstance(mod, WeightOnlyLinear) and leaf == "qweight"
        m = _EXPERT.match(mod_name)  # experts.3.gate_proj -> experts.gate_proj (gguf-py's stacked name)
        expert, lookup = (int(m[2]), f"{m[1]}.{m[3]}") if m else (None, mod_name)
        name = names.get_name(f"{lookup}.{'weight' if quantized else leaf}", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(f"no GGUF name for tensor {key}")
        heads = (n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None) if permuted else None
        if quantized:
            yield (name, *_quantized(mod, mod_name, heads, opts, res), expert)
            continue
        data = value.detach().to(torch.float32).numpy()
        if shift and name.endswith("_norm.weight"):
            data = data + np.float32(shift)
        if heads:
            data = permute_rows(data, heads)
        yield (name, *_float(name, data, opts), expert)


def _quantized(layer, name: str, heads: int | None, opts: GGUFOptions, res: ExportResult):
    import gguf
    import torch

    codes = layer.codes().numpy()
    scale = layer.weight_scale.detach().float().numpy()
    if heads:
        codes, scale = permute_rows(codes, heads), permute_rows(scale, heads)
    small = layer.bits in (3, 4)  # int3 codes (−4..3) are Q4_0 codes: exact, at Q4_0's 4.5 bits per weight
    qtype = gguf.GGMLQuantizationType.Q4_0 if small else gguf.GGMLQuantizationType.Q8_0
    why = exact_reason(layer)
    if why is None:
        res.exact_layers += 1
        if layer.bits == 3 and not any(n.startswith("int3") for n in res.notes):
            res.notes.append("int3 layers are written as Q4_0, exactly (llama.cpp has no 3-bit block type with one fp16 "
                             "scale per 32; its Q3_K re-rounds the scales): the GGUF holds 4.5 bits per weight there")
        packed = (pack_q4_0 if small else pack_q8_0)(codes, scale, layer.group_size)
        return packed, qtype
    if not opts.requantize:
        raise UnsupportedError(f"{name} cannot be written exactly as {qtype.name}: {why}; quantize with "
                               "symmetric groups of 32/64/128 and fp16_scales: true, or export with --requantize")
    res.requantized.append(name)
    w = layer.dequantized(torch.float32).detach().numpy()
    if heads:
        w = permute_rows(w, heads)
    if w.shape[1] % BLOCK:
        raise UnsupportedError(f"{name}: input width {w.shape[1]} is not a multiple of 32, which Q4_0/Q8_0 need")
    return gguf.quants.quantize(w, qtype), qtype


def _float(name: str, data: np.ndarray, opts: GGUFOptions):
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), None
    kind = opts.embeddings if name in ("token_embd.weight", "output.weight") else opts.float_type
    if kind == "q8_0" and data.shape[-1] % BLOCK == 0:
        return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(data, Q.BF16), Q.BF16
    return (data.astype(np.float16), None) if kind in ("f16", "q8_0") else (data.astype(np.float32), None)


def per_layer_widths(config, fam) -> list[int] | None:
    """Each layer's FFN width when the model has per-layer widths (structured pruning, allocation global), else None."""
    from ..families.layer_sizes import KEY

    sizes = getattr(config, KEY, None)
    return list(sizes[fam.ffn.size_key]) if sizes and fam.ffn and fam.ffn.size_key in sizes else None


def _per_layer_arch(fam) -> str | None:
    """The llama.cpp architecture that holds this family's model with per-layer FFN widths, if one does."""
    return None if fam.experts else PER_LAYER_FFN.get(fam.gguf_arch)


def check_architecture(config) -> str:
    """The llama.cpp architecture of a transformers config (its family file's gguf_arch; 'deci' for a Llama-layout
    model with per-layer FFN widths), or an UnsupportedError naming the family and the families that export, or the
    per-layer FFN widths no llama.cpp architecture of the family builds."""
    from .. import families
    from ..families.layer_sizes import has_layer_sizes

    fam = families.of(config)
    if fam is None or not fam.gguf_arch:
        ok = sorted(f.name for f in families.load_all().values() if f.gguf_arch)
        what = f"family '{fam.name}'" if fam else f"model type '{families.model_type(config)}'"
        raise UnsupportedError(f"GGUF export is not available for {what} yet; it supports the families {', '.join(ok)}")
    if has_layer_sizes(config):
        arch, widths = _per_layer_arch(fam), per_layer_widths(config, fam)
        if arch is None or widths is None:
            raise UnsupportedError(_PER_LAYER_REFUSAL.format(arch=fam.gguf_arch))
        if min(widths) <= 0:
            raise UnsupportedError("a layer has FFN width 0, which llama.cpp's 'deci' architecture does not run correctly")
        return arch
    return fam.gguf_arch


_PER_LAYER_REFUSAL = ("this model has per-layer FFN widths (structured pruning with allocation global: slimctl_layer_sizes "
                      "in config.json), and llama.cpp's '{arch}' architecture builds every layer with one FFN width (only "
                      "Llama-layout models export them, as llama.cpp's 'deci'); prune with allocation uniform for a GGUF export")


def export(loaded, path: str | Path, opts: GGUFOptions | None = None) -> ExportResult:
    """Write `loaded` (a slimctl LoadedModel of a causal LM whose family exports) to `path` as GGUF, atomically:
    a temporary sibling renamed into place, so a failure leaves the previous file or none."""
    import gguf

    from .gguf_vocab import add_vocab

    from .. import families

    opts = opts or GGUFOptions()
    config = loaded.model.config
    arch = check_architecture(config)
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder; give the .gguf file to write")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    res = ExportResult(path=str(path), bytes=0, tensors={})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(loaded.source).name or "model")
        res.tokenizer = add_vocab(writer, loaded.path, loaded.tokenizer)
        _config_metadata(writer, config, res.tokenizer["n_vocab"], families.of(config))
        for name, data, raw in _tensors(loaded.model, config, opts, res):
            writer.add_tensor(name, data, raw_dtype=raw)
            res.tensors[name] = raw.name if raw is not None else str(data.dtype)
        writer.add_file_type(_file_type(res.tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    res.bytes = path.stat().st_size
    if res.requantized:
        res.notes.append(f"{len(res.requantized)} layers could not be packed exactly and were quantized again: "
                         f"{', '.join(res.requantized[:3])}")
    return res


def _file_type(tensors: dict[str, str]) -> int:
    """general.file_type: the type most weights have (llama.cpp shows it as the model's type)."""
    import gguf

    F = gguf.LlamaFileType
    kinds = {t for n, t in tensors.items() if n.startswith("blk.") and not n.endswith("_norm.weight")}
    if kinds and kinds <= {"Q4_0", "Q8_0"}:
        return F.MOSTLY_Q8_0 if kinds == {"Q8_0"} else F.MOSTLY_Q4_0
    return F.MOSTLY_F16 if "float16" in kinds else F.ALL_F32


class GGUF:
    """The GGUF exporter (formats/exporters.py): one file for llama.cpp, slimctl's int4/int8 codes packed exactly."""

    format, file, runtime = "gguf", "model.gguf", "llama.cpp"

    def check(self, config, steps=()) -> None:
        from .. import families

        check_architecture(config)
        fam = families.of(config)
        for step in steps:  # per-layer widths come from a step: refused before the run, not after it
            opts = step.options()
            if (step.method == "structured" and opts.get("allocation") == "global" and opts.get("ffn")
                    and _per_layer_arch(fam) is None):
                raise UnsupportedError(f"export gguf after structured pruning with allocation global: its per-layer FFN "
                                       f"widths do not fit llama.cpp's '{fam.gguf_arch}' architecture, which builds every "
                                       "layer with one FFN width (Llama-layout models export them as 'deci'); use "
                                       "allocation uniform in a recipe that exports GGUF")

    def write(self, loaded, dest: Path, spec) -> ExportResult:
        return export(loaded, dest, GGUFOptions(embeddings=spec.embeddings, float_type=spec.float_type,
                                                requantize=spec.requantize))

    def summary(self, res: ExportResult) -> dict[str, Any]:
        return {**vars(res), "tensor_types": res.type_counts()}

    def report_entry(self, res: ExportResult, sha256: str) -> dict[str, Any]:
        return {"format": self.format, "path": res.path, "bytes": res.bytes, "sha256": sha256, "exact_layers": res.exact_layers,
                "requantized_layers": res.requantized, "tokenizer": res.tokenizer, "tensor_types": res.type_counts()}


EXPORTER = GGUF()
