"""The model-family registry: one file per family says how its blocks are laid out (which norm feeds
which Linears, v -> o, up -> down, fused projections and how they split, experts, the norm convention,
the FFN and attention names structured pruning slices, the GGUF architecture), and AWQ, SmoothQuant,
structured pruning, the loaders and the GGUF exporter read it here. A model whose family is not
registered is named in a warning or refused by name, never skipped in silence.

The registry itself is registry.py; family files import from there."""
from __future__ import annotations

from .registry import (
    Fold, FFN, Attention, Family, REGISTRY, register,
    load_all, model_type, of, require, refuse_streaming, text_config,
    head_counts, part_rows, llama_folds, LLAMA_FFN, LLAMA_ATTENTION, rows,
)

__all__ = ["Fold", "FFN", "Attention", "Family", "REGISTRY", "register", "load_all", "model_type", "of", "require",
           "refuse_streaming", "text_config", "head_counts", "part_rows", "llama_folds", "LLAMA_FFN",
           "LLAMA_ATTENTION", "rows"]
