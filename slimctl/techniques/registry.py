"""The technique registry: each technique file registers one config class and one apply function."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._discover import import_package_modules
from ..errors import RecipeError, UnsupportedError
from ..quant.integer import ScaleSearch


class TechniqueConfig(BaseModel):
    """Base of every technique's options: unknown keys are errors, not silent defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerSelection(TechniqueConfig):
    """Options shared by techniques that touch Linear layers."""

    ignore: list[str] = []  # fnmatch patterns of module names, added to the default protections


def power_of_two_group(v: int | None) -> int | None:
    """A weight-only config's `group_size` check: None (per channel) or a power of two."""
    if v is not None and v & (v - 1):
        raise ValueError(f"group_size must be a power of two (32, 64, 128…), not {v}")
    return v


class WeightOnlyOptions(LayerSelection):
    """Integer weight-only quantization options shared by RTN and GPTQ."""

    bits: Literal[3, 4, 8] = 4  # 3: eight codes in three bytes; runs on the int4 kernels (or dequantizes)
    group_size: Optional[int] = Field(default=128, ge=8, le=8192)  # None: one group per output channel
    symmetric: bool = True
    strict: bool = False  # refuse layers whose width the group size does not divide, instead of adapting
    # round each scale to fp16 before choosing the codes, as GGUF's Q4_0/Q8_0 store them: an artifact
    # made so exports to GGUF bit-exactly (slimctl export --format gguf)
    fp16_scales: bool = False
    # how each group's scale is chosen: absmax (max|w| / 7 for int4), signed (llama.cpp Q4_0's max / -8: one
    # more level, a finer step) or mse (the least squared rounding error over shrunk absmax/signed scales)
    scale_search: ScaleSearch = "absmax"

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v):
        return power_of_two_group(v)


class CalibrationOptions(TechniqueConfig):
    """Calibration data for techniques that look at activations (GPTQ, SmoothQuant, Wanda…)."""

    calib_samples: int = Field(default=64, ge=1, le=100_000)  # texts, one batch each
    calib_seq_len: Optional[int] = Field(default=None, ge=8, le=32_768)  # default 256 (causal LM) / 128
    calib_data: Optional[str] = None  # .txt / .jsonl; default: the BBC calibration split (disjoint from eval)
    # precision of the calibration forwards: bfloat16 autocast (matmuls and attention; statistics stay float32)
    # runs about 2x faster on a CPU with native bf16; auto = bfloat16 where the CPU has it (precision.py)
    calib_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # what `auto` may pick on a CPU with native bf16: a step whose choices compare quantities finer than bf16's
    # rounding (AWQ's α grid) says float32
    auto_bf16: ClassVar[bool] = True

    def batches(self, ctx: "StepContext"):
        from .calibrate import calibration_batches

        return calibration_batches(ctx.tokenizer, ctx.kind, self.calib_samples, self.calib_seq_len, self.calib_data, ctx.seed)


def plan_groups(layers: list[tuple[str, Any]], cfg: WeightOnlyOptions, ctx: "StepContext") -> dict[str, int]:
    """The group each layer gets. A width the group does not divide gets the largest power of two
    that does (one note for all such layers), or, with strict, an error naming the layers."""
    from ..quant.integer import resolve_group

    width = {name: lin.in_features for name, lin in layers}
    groups = {name: resolve_group(w, cfg.group_size) for name, w in width.items()}
    odd = {n: g for n, g in groups.items() if cfg.group_size is not None and g != min(cfg.group_size, width[n])}
    if odd:
        names = sorted(odd)
        if cfg.strict:
            raise UnsupportedError(f"group_size {cfg.group_size} does not divide the input width of {len(names)} layers "
                                   f"({', '.join(names[:4])}{', …' if len(names) > 4 else ''}); drop strict or pick another group size")
        used = sorted(set(odd.values()))
        ctx.notes.append(f"group_size {cfg.group_size} does not divide the input width of {len(names)} layers; "
                         f"used group {'/'.join(map(str, used))} there (see the step's groups)")
    if cfg.bits in (3, 4):
        need = 2 if cfg.bits == 4 else 8
        bad = [n for n, w in width.items() if w % need]
        if bad:
            raise UnsupportedError(f"int{cfg.bits} packing needs an input width that is a multiple of {need}; "
                                   f"{bad[0]} has {width[bad[0]]}")
    return groups


def plan_schemes(model, cfg: WeightOnlyOptions, ctx: "StepContext"):
    """The Linears a weight-only step quantizes, the group each gets (plan_groups) and its QScheme."""
    from ..quant.integer import QScheme

    targets = dict(select_linears(model, cfg.ignore))
    groups = plan_groups(list(targets.items()), cfg, ctx)
    schemes = {n: QScheme(cfg.bits, g, cfg.symmetric, cfg.fp16_scales, cfg.scale_search) for n, g in groups.items()}
    return targets, groups, schemes


@dataclass
class StepContext:
    kind: str  # task kind of the model (models.CAUSAL_LM, …)
    seed: int = 0
    tokenizer: Any = None  # for calibration
    track: Callable = lambda it, desc, total: it
    progress: Callable[[str], None] = lambda msg: None
    notes: list[str] = field(default_factory=list)
    replacement: Any = None  # set by a technique whose result is a different model object (e.g. ONNX Runtime)
    teacher: Any = None  # the model before the recipe's steps, kept when a later step trains (distill)


@dataclass(frozen=True)
class Proposal:
    """A candidate `slimctl search` tries when no recipes are given (or with --with-space): its name in the
    search table and this technique's options."""
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # the model kinds it suits; empty: every kind
    order: int = 50  # its place in the built-in space (cheap casts first, structural changes last)


# A pairing: (this step's config, the next step's method, its config, this step's index) -> this step's config
# for that pairing (AWQ searches for the grid the GPTQ or mixed step after it rounds to). Raises ValueError.
Pairing = Callable[[TechniqueConfig, str, TechniqueConfig, int], TechniqueConfig]


@dataclass(frozen=True)
class Technique:
    name: str
    kind: str  # "cast" | "transform" | "quantize" | "prune" | "train"
    config: type[TechniqueConfig]
    apply: Callable[[Any, TechniqueConfig, StepContext], dict]
    summary: str
    loads_with: str  # what reloads its artifact: "transformers", "slimctl" or "onnxruntime"
    streams: bool = False  # works on a streamed skeleton (--stream): touches one block at a time
    precedes: tuple[str, ...] = ()  # quantize methods this quantize step may come directly before (the recipe's
    pair: Pairing | None = None     # one exception to "a layer is quantized once"), and how it adapts to them
    proposals: tuple[Proposal, ...] = ()  # what `slimctl search` proposes with it
    head_only: bool = False  # quantizes only the LM head, which every other step leaves alone: it may join one


REGISTRY: dict[str, Technique] = {}
_loaded = False


def register(name: str, kind: str, config: type[TechniqueConfig], summary: str, loads_with: str = "transformers",
             streams: bool = False, precedes: tuple[str, ...] = (), pair: Pairing | None = None,
             proposals: tuple[Proposal, ...] = (), head_only: bool = False):
    """The one registration of a technique: its options (config), what reloads its artifact, whether it streams,
    which steps it composes with, and what search proposes with it. Recipes, `slimctl methods`, the CLI's help
    and search read it from here."""
    if bool(precedes) != (pair is not None):
        raise RuntimeError(f"technique {name}: precedes and pair go together")

    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"technique {name} registered twice")
        REGISTRY[name] = Technique(name, kind, config, fn, summary, loads_with, streams, precedes, pair, proposals, head_only)
        return fn
    return deco


def load_all() -> dict[str, Technique]:
    """Import every module of this package once (importing one of them directly registers only that one): a new
    technique is one new file here. A module that fails to import is an error, not a silently missing method."""
    global _loaded
    if not _loaded:
        import_package_modules(__package__, skip=("registry",))
        _loaded = True
    return REGISTRY


def proposals(kind: str) -> list[tuple[Proposal, str]]:
    """What search proposes for a model of this kind, in the built-in space's order, with its method."""
    found = [(p, t.name) for t in load_all().values() for p in t.proposals if not p.kinds or kind in p.kinds]
    return sorted(found, key=lambda pt: (pt[0].order, pt[0].name))


def get(name: str) -> Technique:
    reg = load_all()
    if name not in reg:
        raise RecipeError(f"unknown method '{name}'; known: {', '.join(sorted(reg))}")
    return reg[name]


def protected_modules(model) -> set[str]:
    """Names of Linear layers slimctl leaves alone by default: the output embedding (LM head) and
    any layer whose weight is shared with the input embedding (tied weights)."""
    from torch import nn

    from .tying import shares_embedding

    names: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (mod is out or shares_embedding(model, mod)):
            names.add(name)
    return names


def select_linears(model, ignore: list[str]) -> list[tuple[str, Any]]:
    """Linear layers a technique may touch, in module order, after defaults and user ignores."""
    from torch import nn

    protected = protected_modules(model)
    chosen = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or name in protected:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in ignore):
            continue
        chosen.append((name, mod))
    return chosen
