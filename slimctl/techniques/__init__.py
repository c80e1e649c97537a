"""The technique registry: each technique file registers one config class and one apply function."""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from ..errors import RecipeError

# Explicit list: a technique that fails to import is an error, not a silently missing method.
_MODULES = ("cast", "int8_dynamic", "int8_weight_only", "magnitude")


class TechniqueConfig(BaseModel):
    """Base of every technique's options: unknown keys are errors, not silent defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerSelection(TechniqueConfig):
    """Options shared by techniques that touch Linear layers."""

    ignore: list[str] = []  # fnmatch patterns of module names, added to the default protections


@dataclass
class StepContext:
    kind: str  # task kind of the model (models.CAUSAL_LM, …)
    seed: int = 0
    progress: Callable[[str], None] = lambda msg: None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Technique:
    name: str
    kind: str  # "cast" | "quantize" | "prune"
    config: type[TechniqueConfig]
    apply: Callable[[Any, TechniqueConfig, StepContext], dict]
    summary: str
    loads_with: str  # what reloads its artifact: "transformers" or "slimctl"


REGISTRY: dict[str, Technique] = {}


def register(name: str, kind: str, config: type[TechniqueConfig], summary: str, loads_with: str = "transformers"):
    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"technique {name} registered twice")
        REGISTRY[name] = Technique(name, kind, config, fn, summary, loads_with)
        return fn
    return deco


def load_all() -> dict[str, Technique]:
    if not REGISTRY:
        for m in _MODULES:
            importlib.import_module(f".{m}", __name__)
    return REGISTRY


def get(name: str) -> Technique:
    reg = load_all()
    if name not in reg:
        raise RecipeError(f"unknown method '{name}'; known: {', '.join(sorted(reg))}")
    return reg[name]


def protected_modules(model) -> set[str]:
    """Names of Linear layers slimctl leaves alone by default: the output embedding (LM head) and
    any layer whose weight is shared with the input embedding (tied weights)."""
    from torch import nn

    names: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    inp_ptr = inp.weight.data_ptr() if inp is not None and hasattr(inp, "weight") else None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if mod is out or (inp_ptr is not None and mod.weight.data_ptr() == inp_ptr):
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
