"""`slimctl run`, `quantize`, `prune`: a recipe (or one step) through the pipeline, with gates."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from . import _common as C


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    model: str = typer.Option(..., "--model", "-m", help="Built-in name, local HF folder, or hub id."),
    out_dir: Path = C.OUT_OPT, overwrite: bool = C.OVERWRITE_OPT,
    max_samples: Optional[int] = C.MAX_SAMPLES_OPT, seed: Optional[int] = typer.Option(None, "--seed", help="Override the recipe's seed."),
    skip_eval: bool = C.SKIP_EVAL_OPT, skip_bench: bool = C.SKIP_BENCH_OPT, inline: bool = C.INLINE_OPT, as_json: bool = C.JSON_OPT,
    stream: bool = C.STREAM_OPT, stream_auto: bool = C.STREAM_AUTO_OPT,
    allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
    baseline: Optional[Path] = C.BASELINE_OPT, preset: Optional[str] = C.PRESET_OPT, min_quality: Optional[float] = C.MIN_QUALITY_OPT,
    max_latency_increase: Optional[float] = C.MAX_LAT_OPT, max_memory_increase: Optional[float] = C.MAX_MEM_OPT,
    max_size_increase: Optional[float] = C.MAX_SIZE_OPT, junit: Optional[Path] = C.JUNIT_OPT, html: Optional[Path] = C.HTML_OPT,
    compile_: Optional[str] = C.COMPILE_OPT,
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda: where the calibration and the benchmark run (default: the recipe's device and bench.device)."),
    bench_device: Optional[str] = C.BENCH_DEVICE_OPT,
):
    """Run a recipe: baseline eval+bench, the steps, eval+bench of the result, gates, report, artifact.

    Examples:
    [bold]slimctl run recipes/int8-dynamic.yaml --model minilm-l6 --out runs/minilm-int8 --html runs/minilm-int8/report.html[/bold]
    In CI, against last release's report: [bold]slimctl run recipes/int8-dynamic.yaml -m minilm-l6 -o out --baseline release/report.json --preset mlperf-99 --max-latency-increase 10 --junit gates.xml[/bold]
    Calibrate on a GPU, measure on the CPU: [bold]slimctl run recipes/int4-awq-gptq-g32.yaml -m ./my-llama -o out --device cuda --bench-device cpu[/bold]
    """
    from .. import recipe as recipe_mod
    from ..errors import UsageError

    comp = C.compile_flag(compile_)
    r = recipe_mod.load(recipe).with_overrides(max_samples=max_samples, skip_eval=skip_eval, skip_bench=skip_bench,
                                               compile=comp, seed=seed, stream=C.stream_flag(stream, stream_auto),
                                               device=C.device_name(device), bench_device=C.device_name(bench_device, "--bench-device"))
    ci = C.ci_options(baseline, preset, min_quality, max_latency_increase, max_memory_increase, max_size_increase, junit, html)
    if (baseline is None) != (not ci.any_limit()):
        raise UsageError("--baseline and the limits (--preset, --min-quality, --max-*-increase) go together")
    C.run_recipe(r, model, out_dir, overwrite, inline, as_json, str(recipe), C.load_opts(allow_pickle, trust_remote_code, allow_non_finite), ci)


QUANTIZE_KINDS, PRUNE_KINDS = ("quantize", "cast"), ("prune",)
METHOD_HELP = "One of this command's methods (`slimctl methods` says what each does)."


def _methods_of(kinds: tuple[str, ...]) -> list[str]:
    """The registered methods of these kinds (loading the registry imports torch)."""
    from ..techniques import load_all

    return sorted(n for n, t in load_all().items() if t.kind in kinds)


class _MethodsCommand(TyperCommand):
    """A command whose --method help lists the registered techniques of its kinds. The list is read from the
    registry when the help is shown: loading it imports torch, which any other call need not pay for."""

    kinds: tuple[str, ...] = ()

    def format_help(self, ctx, formatter):
        for p in self.params:
            if p.name == "method":
                p.help = f"{', '.join(_methods_of(self.kinds))} (`slimctl methods` says what each does)."
        return super().format_help(ctx, formatter)


class QuantizeCommand(_MethodsCommand):
    kinds = QUANTIZE_KINDS


class PruneCommand(_MethodsCommand):
    kinds = PRUNE_KINDS


def _one_step(method: str, options: dict, kinds: tuple[str, ...], common: dict) -> None:
    """quantize/prune: a one-step recipe for `method`, which must be of one of `kinds`."""
    from .. import recipe as recipe_mod, techniques
    from ..errors import UsageError

    tech = techniques.get(method)
    if tech.kind not in kinds:
        raise UsageError(f"'{method}' is not a method of this command; choose one of: {', '.join(_methods_of(kinds))}")
    ev = C.spec("EvalSpec", max_samples=common["max_samples"], skip=common["skip_eval"])
    device = C.device_name(common["device"])
    be = C.spec("BenchSpec", device=C.device_name(common["bench_device"] or device, "--bench-device"), skip=common["skip_bench"])
    r = recipe_mod.single_step(method, options, ev, be, common["seed"], stream=C.stream_flag(common["stream"], common["stream_auto"]) or False,
                               device=device)
    C.run_recipe(r, common["model"], common["out_dir"], common["overwrite"], common["inline"], common["as_json"], None,
                 C.load_opts(common["allow_pickle"], common["trust_remote_code"], common["allow_non_finite"]))


def quantize(
    model: str = C.MODEL_ARG,
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out_dir: Path = C.OUT_OPT,
    bits: Optional[int] = typer.Option(None, "--bits", help="rtn/gptq/awq: 4 or 8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="rtn/gptq/awq/mixed (its int4): columns per scale (32, 64, 128…); 0 = per channel."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="rtn/gptq/awq/mixed: use a zero point per group."),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="mixed: bits-per-weight budget, scales included (e.g. 4.5)."),
    set_: Optional[List[str]] = C.SET_OPT, ignore: Optional[List[str]] = C.IGNORE_OPT,
    overwrite: bool = C.OVERWRITE_OPT, max_samples: Optional[int] = C.MAX_SAMPLES_OPT, skip_eval: bool = C.SKIP_EVAL_OPT,
    skip_bench: bool = C.SKIP_BENCH_OPT, device: str = C.DEVICE_OPT, bench_device: Optional[str] = C.BENCH_DEVICE_OPT,
    seed: int = C.SEED_OPT, inline: bool = C.INLINE_OPT,
    stream: bool = C.STREAM_OPT, stream_auto: bool = C.STREAM_AUTO_OPT,
    as_json: bool = C.JSON_OPT, allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Quantize or cast a model, measure it against the original and save the artifact.

    Example: [bold]slimctl quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out runs/smol-gptq[/bold]
    Mixed int4/int8 per Linear: [bold]slimctl quantize smollm2-135m --method mixed --avg-bits 4.5 --out runs/smol-mixed[/bold]
    Each group's scale searched for the least rounding error (default: max|w|/7): [bold]… --method gptq --group-size 32 --set scale_search=mse[/bold]
    A model larger than memory, one block at a time: [bold]slimctl quantize ./big-llama --method gptq --stream --out runs/big-gptq[/bold]
    GPTQ's calibration on a GPU, the benchmark on this CPU: [bold]slimctl quantize ./my-llama --method gptq --device cuda --bench-device cpu --out runs/gptq[/bold]
    """
    common = dict(locals())
    opts = C.set_options(set_)
    if ignore:
        opts["ignore"] = ignore
    if bits is not None:
        opts["bits"] = bits
    if group_size is not None:
        opts["group_size"] = group_size or None
    if asymmetric:
        opts["symmetric"] = False
    if avg_bits is not None:
        opts["avg_bits"] = avg_bits
    _one_step(method, opts, QUANTIZE_KINDS, common)


def prune(
    model: str = C.MODEL_ARG,
    method: str = typer.Option("magnitude", "--method", help=METHOD_HELP),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Unstructured: fraction of weights to zero, in (0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured instead, e.g. 2:4 (N non-zeros kept per M)."),
    scope: Optional[str] = typer.Option(None, "--scope", help="magnitude: layer (default, same sparsity per layer) or global (one threshold)."),
    out_dir: Path = C.OUT_OPT,
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other method option as KEY=VALUE (repeatable), e.g. --set ffn=0.25."),
    ignore: Optional[List[str]] = C.IGNORE_OPT,
    overwrite: bool = C.OVERWRITE_OPT, max_samples: Optional[int] = C.MAX_SAMPLES_OPT, skip_eval: bool = C.SKIP_EVAL_OPT,
    skip_bench: bool = C.SKIP_BENCH_OPT, device: str = C.DEVICE_OPT, bench_device: Optional[str] = C.BENCH_DEVICE_OPT,
    seed: int = C.SEED_OPT, inline: bool = C.INLINE_OPT,
    stream: bool = C.STREAM_OPT, stream_auto: bool = C.STREAM_AUTO_OPT,
    as_json: bool = C.JSON_OPT, allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Prune a model, measure it against the original and save the artifact.

    Examples:
    [bold]slimctl prune smollm2-135m --method wanda --sparsity 0.5 --out runs/smol-wanda50[/bold]
    [bold]slimctl prune smollm2-135m --method sparsegpt --pattern 2:4 --out runs/smol-sgpt24[/bold]
    [bold]slimctl prune smollm2-135m --method structured --set ffn=0.25 --out runs/smol-ffn25[/bold]
    [bold]slimctl prune smollm2-135m --method depth --set blocks=6 --out runs/smol-depth6[/bold]
    """
    common = dict(locals())
    opts = C.set_options(set_)
    for key, val in (("sparsity", sparsity), ("pattern", pattern), ("scope", scope), ("ignore", ignore)):
        if val is not None:
            opts[key] = val
    _one_step(method, opts, PRUNE_KINDS, common)
