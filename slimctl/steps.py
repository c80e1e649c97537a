"""Applying a recipe's steps to a model in memory, each measured (seconds, peak and added RSS), with
progress through a small UI object; used by the pipeline, the library API and the bench worker."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .recipe import Recipe


@dataclass
class UI:
    say: Callable[[str], None] = lambda msg: None
    track: Callable[[Iterable, str, int], Iterable] = lambda it, desc, total: it


def apply_steps(model, tokenizer, recipe: Recipe, kind: str, ui: UI) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """Apply each step in order; record its own stats plus seconds and peak RSS while it ran.
    Returns the slimmed model (a step may replace it, e.g. by an ONNX Runtime one), stats, notes."""
    from . import techniques
    from .machine import PeakMemory, release_freed_memory, rss_mb

    ctx = techniques.StepContext(kind=kind, seed=recipe.seed, progress=ui.say, tokenizer=tokenizer, track=ui.track)
    results = []
    for step in recipe.steps:
        tech = techniques.get(step.method)
        ui.say(f"applying {step.method}")
        release_freed_memory()
        before = rss_mb()  # the process already holds the baseline (for side-by-side eval) and this model
        t0 = time.perf_counter()
        with PeakMemory("cpu") as mem:
            stats = tech.apply(model, step.config, ctx)
        results.append({"method": step.method, "options": step.options(), "seconds": round(time.perf_counter() - t0, 3),
                        "peak_rss_mb": round(mem.peak_mb, 1), "added_rss_mb": round(max(mem.peak_mb - before, 0.0), 1),
                        "loads_with": tech.loads_with, **stats})
        if ctx.replacement is not None:
            model, ctx.replacement = ctx.replacement, None
    return model, results, ctx.notes
