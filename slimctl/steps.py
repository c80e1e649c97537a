"""Applying a recipe's steps to a model in memory, each measured (seconds, peak and added RSS), with
progress through a small UI object; used by the pipeline, the library API and the bench worker."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .recipe import Recipe
from .results.report import StepRecord


@dataclass
class UI:
    say: Callable[[str], None] = lambda msg: None
    track: Callable[[Iterable, str, int], Iterable] = lambda it, desc, total: it


def apply_steps(model, tokenizer, recipe: Recipe, kind: str, ui: UI) -> tuple[Any, list[StepRecord], list[str]]:
    """Apply each step in order; record its own stats plus seconds and peak RSS while it ran.
    Returns the slimmed model (a step may replace it, e.g. by an ONNX Runtime one), stats, notes."""
    from . import techniques
    from .machine import PeakMemory, release_freed_memory, rss_mb
    from .results.stages import collecting
    from .techniques.placement import calibration_device
    from .techniques.precision import calibration_precision

    ctx = techniques.StepContext(kind=kind, seed=recipe.seed, progress=ui.say, tokenizer=tokenizer, track=ui.track)
    ctx.teacher = _teacher_copy(model, recipe, ui)
    results = []
    for step in recipe.steps:
        tech = techniques.get(step.method)
        ui.say(f"applying {step.method}")
        release_freed_memory()
        before = rss_mb()  # the process already holds the baseline (for side-by-side eval) and this model
        t0 = time.perf_counter()
        census = layer_census(model)
        with calibration_device(recipe.device) as dev, PeakMemory("cpu") as mem, \
                PeakMemory(dev.type) if dev.type != "cpu" else contextlib.nullcontext() as gpu, collecting() as stages, \
                calibration_precision(getattr(step.config, "calib_dtype", "float32"),
                                      getattr(step.config, "auto_bf16", True)) as used:
            stats = tech.apply(model, step.config, ctx)
        if used != "float32":
            stats = {**stats, "calibration_precision": used}
        if gpu is not None:
            stats = {**stats, "calibration_device": dev.type, "peak_gpu_mb": round(gpu.peak_mb, 1)}
        seconds = time.perf_counter() - t0
        changed = None if ctx.replacement is not None else changed_layers(census, model)
        if changed is not None:
            check_changed(model, step.method, tech.kind, changed, census, ctx.notes)
        results.append(StepRecord.model_validate({"method": step.method, "options": step.options(), "seconds": round(seconds, 3),
                        "peak_rss_mb": round(mem.peak_mb, 1), "added_rss_mb": round(max(mem.peak_mb - before, 0.0), 1),
                        "loads_with": tech.loads_with, **stats,
                        **({"layers_changed": len(changed)} if changed is not None else {}),
                        **({"time_breakdown": stages.record(seconds)} if stages.seconds else {})}))
        if ctx.replacement is not None:
            model, ctx.replacement = ctx.replacement, None
    ctx.teacher = None
    return model, results, ctx.notes


def _teacher_copy(model, recipe: Recipe, ui: UI):
    """A copy of the model before any step, when a train step (distill) will need it as its teacher."""
    import copy

    from . import techniques

    if not any(techniques.get(s.method).kind == "train" and s.config.teacher is None for s in recipe.steps):
        return None
    ui.say("keeping a copy of the model as the distillation teacher")
    return copy.deepcopy(model).eval()


def layer_census(model) -> dict[str, tuple]:
    """Per module that owns a weight matrix (2-D or more): its identity, its weight's identity and version
    counter. Cheap (no copies); an in-place change bumps the version, a replaced module changes identity."""
    out = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                out[name] = (id(mod), type(mod).__name__, pname, id(p), p._version, tuple(p.shape))
                break
    return out


def changed_layers(before: dict[str, tuple], model) -> list[str]:
    after = layer_census(model)
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))


def check_changed(model, method: str, kind: str, changed: list[str], before: dict[str, tuple], notes: list[str]) -> None:
    """A quantize or prune step that changed no layer is an error (the model would come back unchanged,
    labelled slimmed); weight matrices of kinds no Linear technique reads are named in a note."""
    from .errors import UnsupportedError
    from .families import model_type

    if kind not in ("quantize", "prune"):
        return
    if not changed:
        raise UnsupportedError(f"{method} changed no layer of {type(model).__name__} (model type '{model_type(model)}'): "
                               "it has no layers of a kind the method handles, or all were ignored; nothing to save")
    odd = sorted({v[1] for n, v in before.items() if n not in changed
                  and not v[1].endswith(("Embedding", "Router", "Gate", "Norm", "Linear"))})
    if odd:
        notes.append(f"{method} left weights of these module kinds as they were: {', '.join(odd)}")
