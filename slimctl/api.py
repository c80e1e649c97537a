"""The library API: what the CLI does, callable from Python without it.

    import slimctl
    model = slimctl.slim(model, "recipes/int4-gptq-g64.yaml", tokenizer=tok)      # in memory, in place
    result = slimctl.evaluate("runs/x/model", against="smollm2-135m")            # accuracy side by side
    result = slimctl.bench("runs/x/model")                                       # speed, memory (fresh processes)
    report = slimctl.run("recipes/int8-dynamic.yaml", "minilm-l6", out="runs/x")  # the whole pipeline

Each returns plain data (the JSON form of the typed results in slimctl.report); errors are
slimctl.errors.SlimctlError subclasses. No torch import happens until a function is called."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .recipe import BenchSpec, EvalSpec, Recipe


def _recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    from . import recipe as R

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return R.from_dict(recipe, "recipe")
    return R.load(Path(recipe))


def slim(model, recipe: Recipe | str | Path | dict, tokenizer=None, kind: str | None = None,
         say: Callable[[str], None] = lambda m: None):
    """Apply a recipe's steps to a transformers model in memory; returns the slimmed model (a step
    may replace it, e.g. ONNX) and leaves evaluation, saving and benchmarking to the caller."""
    from .kinds import detect_kind
    from .steps import UI, apply_steps

    kind = kind or detect_kind(model.config.to_dict())
    slimmed, _, _ = apply_steps(model, tokenizer, _recipe(recipe), kind, UI(say=say))
    return slimmed


def evaluate(model: str, against: str | None = None, spec: EvalSpec | None = None, kernels: str = "auto",
             seed: int = 0, load_options: dict | None = None, say: Callable[[str], None] = lambda m: None,
             track=None) -> dict[str, Any]:
    """`slimctl eval`: a model's accuracy on spec's data (and lm-eval tasks), with agreement metrics
    against a baseline model when given. Returns the evaluation with `warnings`."""
    from .evaluate import evaluate_model

    return evaluate_model(model, against, spec, kernels, seed, load_options, say, track)


def bench(model: str | None = None, config: str | None = None, specs: dict[str, BenchSpec] | None = None,
          prices: dict[str, float | None] | None = None, say: Callable[[str], None] = lambda m: None, **study) -> dict[str, Any]:
    """`slimctl bench`: one model (or a --config architecture with random weights) measured in fresh
    processes on each device in `specs` (default: CPU); `study` takes sweep options (sizes, dtypes,
    max_memory_mb, slo_p95_ms, repeats, inline, load_options, steps, recipe)."""
    from .bench import bench_models

    return bench_models(model, config, specs, prices, say, **study)


def run(recipe: Recipe | str | Path | dict, model: str, out: str | Path, overwrite: bool = False,
        load_options: dict | None = None, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """`slimctl run`: the whole pipeline into `out`; returns the report (`passed` is False when a gate failed)."""
    from .workflow import pipeline

    return pipeline.run(_recipe(recipe), model, out, overwrite=overwrite, ui=pipeline.UI(say=say),
                        recipe_source=str(recipe) if isinstance(recipe, (str, Path)) else None, load_options=load_options)
