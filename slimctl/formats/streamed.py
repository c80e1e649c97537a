"""Opening a model folder as a streamed skeleton (stream.py): a source model, or a slimctl artifact whose
quantized modules slimctl.json names (their packed tensors unpacked unit by unit)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..families.layer_sizes import apply_layer_sizes, has_layer_sizes
from ..heap import freeze_heap_once
from ..stream.files import TensorFiles, stored_dtype
from ..stream.skeleton import Streamer, skeleton, to_meta


def open_streamed(folder: Path, kind: str, meta: dict[str, Any] | None = None) -> tuple[nn.Module, Streamer]:
    """A streamed skeleton of a model folder (a source model, or a slimctl artifact whose quantized
    modules slimctl.json names), with its streamer attached."""
    from transformers import AutoConfig

    from ..quant.layers import build_from_meta

    _large_allocations_unmapped()
    freeze_heap_once()  # the imports are done, no block is in memory yet
    config = AutoConfig.from_pretrained(folder)
    qmeta = (meta or {}).get("quantized_modules") or {}
    if hasattr(config, "quantization_config") and qmeta:
        del config.quantization_config
    transform = _unpacker(qmeta) if qmeta else None
    files = TensorFiles(folder, transform)
    model = skeleton(config, kind, stored_dtype(files))
    if has_layer_sizes(config):  # per-layer FFN widths (structured pruning, allocation global)
        import torch

        with torch.device("meta"):
            apply_layer_sizes(model)
    if qmeta:
        build_from_meta(model, qmeta)
        to_meta(model)
    st = Streamer(model, files)
    model._slimctl_stream = st
    return model, st


def _large_allocations_unmapped() -> None:
    """glibc serves allocations below a threshold that grows (up to 32 MB) from its heap, where freed
    blocks of a streamed layer fragment and stay resident; fixing the threshold at 1 MB makes every
    tensor of a block its own mapping, returned to the OS when freed."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _unpacker(qmeta: dict[str, dict]):
    """(tensors of one unit, its prefix) -> slimctl's buffers, for the quantized modules inside it."""
    from .ctformat import to_slimctl_state

    def transform(state, prefix):
        return to_slimctl_state(state, {n: s for n, s in qmeta.items() if n.startswith(prefix + ".") or n == prefix})
    return transform


def read_meta(folder: Path) -> dict[str, Any]:
    p = Path(folder) / "slimctl.json"
    return json.loads(p.read_text()) if p.exists() else {}
