"""The model-family registry: one file per family says how its blocks are laid out (which norm feeds
which Linears, v -> o, up -> down, fused projections and how they split, experts, the norm convention,
the FFN and attention names structured pruning slices, the GGUF architecture), and AWQ, SmoothQuant,
structured pruning, the loaders and the GGUF exporter read it here. A model whose family is not
registered is named in a warning or refused by name, never skipped in silence."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from .._discover import import_package_modules
from ..errors import UnsupportedError


@dataclass(frozen=True)
class Fold:
    """Linears whose common input is the output of `prev`: dividing that output by s and multiplying the
    Linears' input columns by s leaves the block's function unchanged (AWQ, SmoothQuant)."""

    prev: str  # module path inside the block ("" is the block itself)
    linears: tuple[str, ...]  # modules reading prev's output (a router's weight is scaled like a Linear's)
    inspect: str  # module whose output scores a candidate scale ("" = the whole block)
    how: str = "norm"  # "norm": an elementwise weight (and bias); "rows": a Linear's output rows (and bias)
    part: str | None = None  # rows of a fused producer: "v" of a qkv projection, "up" of gate_up
    heads: bool = False  # v -> o under grouped-query attention: each kv head feeds several query heads


@dataclass(frozen=True)
class FFN:
    """The FFN channels structured pruning removes: rows of the producers, columns of the consumer."""

    producers: tuple[str, ...]
    consumer: str
    size_key: str  # the config key holding the intermediate width
    parts: int = 1  # a fused producer stacks this many blocks of channel rows (Phi-3 gate_up: gate rows, then up rows)


@dataclass(frozen=True)
class Attention:
    """Separate q/k/v/o projections (head pruning slices their rows and the output's columns)."""

    q: str
    k: str
    v: str
    o: str
    # the config can say the head size (head_dim), so heads can be removed and transformers reloads it;
    # False where the model computes hidden_size / heads (BERT, OPT)
    resizable: bool = True


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this file covers
    summary: str
    folds: Callable[[Any, Any], list[Fold]]  # (block, config) -> the exact folds of one block
    no_fold: tuple[str, ...] = ()  # groups with no exact fold, and why (AWQ records them)
    ffn: FFN | None = None
    attention: Attention | None = None
    norm_offset: float = 0.0  # the norm computes x̂ · (offset + w): Gemma's 1 + w
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused projection -> its parts in row order
    no_clip: tuple[str, ...] = ("q_proj", "k_proj", "query", "key")  # AWQ leaves these unclipped (attention scores)
    conv1d: bool = False  # GPT-2's transposed Conv1D layers: turned into nn.Linear on load, back on save
    experts: bool = False  # transformers 5 fused 3-D experts: unfused into one Linear per expert on load
    gguf_arch: str | None = None  # llama.cpp's name for the architecture, when slimctl exports it
    gguf_meta: Callable[[Any, Any], None] | None = None  # (GGUFWriter, config): the family's own keys
    encoder: bool = False
    # a tiny random model of the architecture for the test matrix: (transformers config class, its keyword
    # arguments, "causal-lm" or "encoder"); families/tiny.py holds the shared shapes
    tiny: tuple[str, dict[str, Any], str] | None = None


REGISTRY: dict[str, Family] = {}
_BY_TYPE: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in REGISTRY:
        raise RuntimeError(f"model family {family.name} registered twice")
    REGISTRY[family.name] = family
    for t in family.model_types:
        _BY_TYPE[t] = family
    return family


HELPERS = ("registry", "convert", "folding", "layer_sizes", "tiny")  # modules here that are not family files


@functools.cache
def _import_family_files() -> None:
    """Each other module of this package is a family file that registers its families on import: a new family is
    one new file, found without a list to edit. One that fails to import is an error, not a missing family."""
    import_package_modules(__package__, skip=HELPERS)


def load_all() -> dict[str, Family]:
    _import_family_files()
    return REGISTRY


def model_type(model_or_config) -> str:
    """The model type of a model, its config, or a config.json read as a dict."""
    if isinstance(model_or_config, dict):
        return model_or_config.get("model_type") or "unknown"
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) or type(model_or_config).__name__


def of(model_or_config) -> Family | None:
    """The registered family of a model (or its config), or None."""
    load_all()
    return _BY_TYPE.get(model_type(model_or_config))


def require(model, what: str) -> Family:
    """The model's family, or an error naming the model type and the step that needs a family file."""
    fam = of(model)
    if fam is None:
        load_all()
        raise UnsupportedError(f"{what} needs the block layout of model type '{model_type(model)}', which slimctl's "
                               f"family registry does not have (known: {', '.join(sorted(_BY_TYPE))}); "
                               "see docs/development.md, 'Adding a model family'")
    return fam


def refuse_streaming(config: dict) -> None:
    """--stream reads each block's tensors from the files by the in-memory names: families whose layers
    slimctl converts on load (Conv1D, fused experts stored per expert) are refused up front, by name."""
    fam = of(config)
    if fam is not None and (fam.conv1d or fam.experts):
        what = "GPT-2's Conv1D layers" if fam.conv1d else "mixture-of-experts blocks (experts converted on load)"
        raise UnsupportedError(f"--stream does not handle {what} yet (family '{fam.name}'); slim it without --stream")


def text_config(config):
    """The language model's config of a composite config (Gemma 3's text_config), else the config."""
    return getattr(config, "text_config", None) or config


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the config keys the families use."""
    c = text_config(config)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    kv = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def part_rows(family: Family, fused: str, part: str, rows: int, config) -> slice:
    """The output rows of `part` inside the fused projection `fused` (qkv: by head counts; else equal parts)."""
    parts = family.fused[fused]
    if parts == ("q", "k", "v"):
        heads, kv, hd = head_counts(config)
        sizes = [heads * hd, kv * hd, kv * hd]
        if sum(sizes) != rows:  # e.g. GPT-2: three equal hidden-wide parts
            sizes = [rows // 3] * 3
    else:
        sizes = [rows // len(parts)] * len(parts)
    start = sum(sizes[: parts.index(part)])
    return slice(start, start + sizes[parts.index(part)])


def llama_folds(block, config, norm_mlp: str = "post_attention_layernorm") -> list[Fold]:
    """The folds of a Llama-shaped block: norm -> q/k/v, v -> o (grouped-query aware), norm -> gate/up,
    up -> down. Shared by Llama, Mistral, Qwen2/3, Granite and Gemma (whose MLP norm has another name)."""
    return [
        Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Fold("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", how="rows", heads=True),
        Fold(norm_mlp, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Fold("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", how="rows"),
    ]


LLAMA_FFN = FFN(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
LLAMA_ATTENTION = Attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def rows() -> list[dict[str, Any]]:
    """One row per family for `slimctl models --families` and the docs."""
    return [{"family": f.name, "model_types": list(f.model_types), "summary": f.summary,
             "gguf": f.gguf_arch or "", "structured": bool(f.ffn or f.attention)}
            for f in load_all().values()]

