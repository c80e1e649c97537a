"""Artifact formats behind one protocol (GGUF files for llama.cpp are written by gguf.py and run by
llamacpp.py): which format a folder holds (detect), how to load it, which
format a model in memory saves as (holds), how to write it, what loads it, and its weights' bytes.

Detection order matters: the most specific format first, plain transformers last."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Format(Protocol):
    name: str
    loads_with: str  # what a user can load the artifact with, as the report says it

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Whether `folder` (its config.json and slimctl.json already read) holds this format."""

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        """The model in `folder`, for inference, on CPU."""

    def holds(self, model) -> bool:
        """Whether a model in memory is of this format (and so saves as it)."""

    def save(self, model, folder: Path) -> None:
        """Write the model's weights and config into `folder` (the tokenizer and slimctl.json are written by the caller)."""

    def state_bytes(self, model) -> int:
        """Bytes of the model's weights as stored in memory."""

    def bench_meta(self, model) -> dict[str, Any]:
        """What a bench result records about how this format ran (runtime, fallbacks)."""


WEIGHT_FILES = ("*.safetensors", "*.onnx")  # what holds the weights of any format slimctl writes


def weight_file_bytes(folder: str | Path) -> int | None:
    """Bytes of a model folder's weight files (the size on disk a report compares); None when there are none."""
    folder = Path(folder)
    if folder.is_file():  # a single-file model (GGUF)
        return folder.stat().st_size
    return sum(p.stat().st_size for pat in WEIGHT_FILES for p in folder.glob(pat)) or None


def all_formats() -> list[Format]:
    from .bnb import BitsAndBytes
    from .llamacpp import LlamaCpp
    from .native import CompressedTensors, Native
    from .onnx import Onnx
    from .transformers import Transformers

    return [LlamaCpp(), Onnx(), CompressedTensors(), Native(), BitsAndBytes(), Transformers()]


def for_folder(folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> Format:
    return next(f for f in all_formats() if f.detect(folder, config, meta))


def for_model(model) -> Format:
    return next(f for f in all_formats() if f.holds(model))
