"""Artifact formats behind one protocol (GGUF files for llama.cpp are written by gguf.py and run by
llamacpp.py): which format a folder holds (detect), how to load it, which
format a model in memory saves as (holds), how to write it, what loads it, and its weights' bytes.

The protocol and the lookup are in base.py."""
from __future__ import annotations

from .base import (
    Format, WEIGHT_FILES, weight_file_bytes, all_formats, for_folder, for_model,
)

__all__ = ["Format", "WEIGHT_FILES", "weight_file_bytes", "all_formats", "for_folder", "for_model"]
