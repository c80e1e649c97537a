"""The Python heap of a process slimctl owns (the CLI, a benchmark worker): frozen once, before the first model,
so that each later full collection (machine.release_freed_memory: once per step, per benchmark, per streamed block)
scans only what came after the imports. Imports no torch, so the CLI can mark its process at start.
SLIMCTL_HEAP_FREEZE=0 turns it off (scripts/bench_heap.py measures both ways)."""
from __future__ import annotations

import gc
import os

_HEAP = {"owned": False, "frozen": False}


def own_heap() -> None:
    """Mark this process as slimctl's own: freeze_heap_once may then freeze its heap."""
    _HEAP["owned"] = True


def freeze_heap_once() -> None:
    """In a process slimctl owns, once: one full collection, then every object alive (the imports of torch and
    transformers: ~400 k objects) leaves the cyclic collector's sight (gc.freeze). A full collection then takes
    milliseconds instead of 0.2 s (2-vCPU AMD EPYC). Not done in a library caller's process, whose own objects it
    would keep from cyclic collection."""
    if _HEAP["owned"] and not _HEAP["frozen"] and os.environ.get("SLIMCTL_HEAP_FREEZE") != "0":
        _HEAP["frozen"] = True
        gc.collect()
        gc.freeze()
