"""What every command shares: the option definitions (defined once), progress on stderr, one output
helper (stdout is data; --json prints exactly one JSON document), and building typed options."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

MODEL_ARG = typer.Argument(..., help="Built-in name, local HF folder, or hub id.")
JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
OUT_OPT = typer.Option(..., "--out", "-o", help="Output folder: report.json, report.md and model/ go here.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace a previous slimctl output in --out.")
SEED_OPT = typer.Option(0, "--seed", help="Seed for every random choice (data order, calibration).")
MAX_SAMPLES_OPT = typer.Option(None, "--max-samples", help="Eval on at most N samples (documents / texts).")
INLINE_OPT = typer.Option(False, "--inline", help="Bench in this process instead of a fresh one (debugging).")
SKIP_EVAL_OPT = typer.Option(False, "--skip-eval", help="Do not evaluate accuracy.")
SKIP_BENCH_OPT = typer.Option(False, "--skip-bench", help="Do not benchmark speed and memory.")
STREAM_OPT = typer.Option(False, "--stream", help="Stream the model block by block from its safetensors files: peak "
                          "memory about one block, sharded artifact (rtn, gptq, awq, smoothquant, magnitude, wanda, sparsegpt).")
STREAM_AUTO_OPT = typer.Option(False, "--stream-auto", help="Stream only when the model's weights exceed half the "
                               "available memory.")
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu or cuda: where the calibration (forwards, statistics, solves) and the benchmark run.")
BENCH_DEVICE_OPT = typer.Option(None, "--bench-device", help="cpu or cuda: benchmark there instead (e.g. calibrate on the GPU, measure on the CPU you serve from).")
PICKLE_OPT = typer.Option(False, "--allow-pickle", help="Load pickle-only weights (torch.load weights_only=True); refused by default.")
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Run custom modelling code a model folder asks for; off by default.")
NONFINITE_OPT = typer.Option(False, "--allow-non-finite", help="Load weights that hold NaN or Inf (refused by default: a broken checkpoint).")
KV_OPT = typer.Option("fp", "--kv-cache", "--kv-type", help="Causal LMs: the KV cache: fp, int8 or int4 (blocks of 32 with an "
                      "fp16 scale; for a GGUF llama.cpp's own f16 / q8_0 / q4_0, names accepted either way).")
COMPILE_OPT = typer.Option(None, "--compile", help="Causal LMs: also decode on a static KV cache under torch.compile (CUDA "
                           "graphs on GPU). true: report it; auto: the faster of eager and compiled; false: eager only.")
RUNTIME_OPT = typer.Option("auto", "--runtime", help="auto: llama.cpp for a .gguf file, torch otherwise; torch; or llamacpp "
                           "(MODEL must then be a .gguf, e.g. from slimctl export).")
SET_OPT = typer.Option(None, "--set", help="Any other method option as KEY=VALUE (repeatable), e.g. --set alpha=0.8.")
IGNORE_OPT = typer.Option(None, "--ignore", help="Module name pattern to leave alone (repeatable).")
# Regression gates and CI outputs, shared by `run` and `gate`.
BASELINE_OPT = typer.Option(None, "--baseline", help="An earlier report.json: gate this run's slimmed model against its slimmed model.")
PRESET_OPT = typer.Option(None, "--preset", help="mlperf-99 or mlperf-99.9: accuracy at least 99 % / 99.9 % of the baseline report's.")
MIN_QUALITY_OPT = typer.Option(None, "--min-quality", help="Accuracy as a fraction of the baseline report's (perplexity: old/new), e.g. 0.98.")
MAX_LAT_OPT = typer.Option(None, "--max-latency-increase", help="Allowed p50 latency increase over the baseline report, % (noise-aware).")
MAX_MEM_OPT = typer.Option(None, "--max-memory-increase", help="Allowed peak-memory increase over the baseline report, %.")
MAX_SIZE_OPT = typer.Option(None, "--max-size-increase", help="Allowed size increase over the baseline report, %.")
JUNIT_OPT = typer.Option(None, "--junit", help="Write the gates as JUnit XML here (one test case per gate).")
HTML_OPT = typer.Option(None, "--html", help="Write a self-contained HTML report here.")


class UI:
    """Progress to stderr: a line per step and a bar per long loop (hidden when stderr is not a TTY)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            err.print(f"[dim]• {msg}[/dim]")

    def track(self, it: Iterable, desc, total: int) -> Iterable:
        """A bar over `it`; `desc` is text, or a callable read after each item (a live figure: loss, tokens/s)."""
        if self.quiet or not err.is_terminal:
            return it
        from rich.progress import Progress, track

        if not callable(desc):
            return track(it, description=desc, total=total, console=err, transient=True)
        return _live(it, desc, total, Progress(*Progress.get_default_columns(), console=err, transient=True))

    def pipeline_ui(self):
        from ..steps import UI as PipelineUI

        return PipelineUI(say=self.say, track=self.track)


def _live(it: Iterable, desc: Callable[[], str], total: int, progress) -> Iterable:
    with progress:
        task = progress.add_task(desc(), total=total)
        for item in it:
            yield item
            progress.update(task, advance=1, description=desc())


def emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """One JSON document, or the human rendering, on stdout."""
    if as_json:
        from ..render import to_json

        sys.stdout.write(to_json(data))
    else:
        out.print(human(data), markup=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {msg}", markup=True, highlight=False)


def fail_on_gates(rows: list) -> None:
    """Exit 1 (GateFailed) when any gate row failed."""
    from ..errors import GateFailed
    from ..results.gates import failures

    failed = failures(rows)
    if failed:
        raise GateFailed(failed)


def load_opts(allow_pickle: bool, trust_remote_code: bool, allow_non_finite: bool = False) -> dict:
    return {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code, "allow_non_finite": allow_non_finite}


def typed(cls, **options):
    """A pydantic options model from command-line values; a bad value is a usage error naming the --option."""
    from pydantic import ValidationError

    from ..errors import UsageError
    from ..recipe import format_error

    try:
        return cls.model_validate(options)
    except ValidationError as e:
        field, sep, why = format_error(e).partition(": ")  # name the option as typed: --max-samples, values as they are
        raise UsageError(f"--{field.replace('_', '-')}{sep}{why}") from None


def spec(name: str, **options):
    """An EvalSpec/BenchSpec from command-line options."""
    from .. import recipe

    return typed(getattr(recipe, name), **options)


def compile_flag(value: Optional[str]):
    """--compile VALUE as the recipe's bench.compile: True, False or "auto" (None: keep the recipe's)."""
    if value is None:
        return None
    table = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False,
             "auto": "auto"}
    v = value.strip().lower()
    if v not in table:
        from ..errors import UsageError

        raise UsageError(f"--compile takes auto, true or false, not {value!r}")
    return table[v]


def ci_options(baseline, preset, min_quality, max_lat, max_mem, max_size, junit, html):
    from ..workflow.ci import CIOptions
    from ..errors import UsageError
    from ..results.gates import PRESETS
    from ..results.report import read

    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if baseline is not None:
        read(baseline)  # a bad baseline fails now, not after minutes of work
    return CIOptions(baseline=baseline, preset=preset, min_quality=min_quality, max_latency_increase_pct=max_lat,
                     max_memory_increase_pct=max_mem, max_size_increase_pct=max_size, junit=junit, html=html)


def check_runtime(runtime: str, model: str | None) -> None:
    """--runtime against MODEL: llama.cpp runs .gguf files, torch runs everything else."""
    from ..errors import UsageError

    if runtime not in ("auto", "torch", "llamacpp"):
        raise UsageError(f"--runtime takes auto, torch or llamacpp, not {runtime!r}")
    gguf = bool(model) and str(model).endswith(".gguf")
    if runtime == "llamacpp" and not gguf:
        raise UsageError("--runtime llamacpp runs a .gguf file; write one with slimctl export MODEL --format gguf --out F.gguf")
    if runtime == "torch" and gguf:
        raise UsageError("a .gguf file runs with llama.cpp (--runtime llamacpp or auto), not torch")


def set_options(pairs: Optional[list[str]]) -> dict:
    """--set KEY=VALUE pairs; values are read as YAML scalars (0.8, true, null, text)."""
    import yaml

    from ..errors import UsageError

    opts = {}
    for p in pairs or []:
        key, sep, val = p.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got {p!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(val)
    return opts


def stream_flag(stream: bool, auto: bool) -> bool | str | None:
    """--stream / --stream-auto as a recipe's `stream` (None: keep the recipe's)."""
    from ..errors import UsageError

    if stream and auto:
        raise UsageError("--stream and --stream-auto are exclusive: --stream always streams, --stream-auto when the model is large")
    return True if stream else ("auto" if auto else None)


def device_name(value: str | None, flag: str = "--device") -> str | None:
    """A --device / --bench-device value checked: cpu or cuda (None passes through)."""
    from ..errors import UsageError

    if value is not None and value not in ("cpu", "cuda"):
        raise UsageError(f"{flag} takes cpu or cuda; got {value!r}")
    return value


def run_recipe(recipe, model: str, out_dir: Path, overwrite: bool, inline: bool, as_json: bool, source: str | None,
               load_options: dict, ci=None) -> None:
    """The shared end of run/quantize/prune: the pipeline, the CI outputs, the rendering, exit 1 on a failed gate."""
    from ..workflow import pipeline
    from ..render import text

    report = pipeline.run(recipe, model, out_dir, overwrite=overwrite, isolate=not inline,
                          ui=UI().pipeline_ui(), recipe_source=source, load_options=load_options)
    from ..results.report import as_report
    from ..workflow import ci as ci_mod

    rep = ci_mod.apply(report, ci, out_dir) if ci is not None else as_report(report)
    emit(rep, as_json, text.run)
    fail_on_gates(rep.gates)
