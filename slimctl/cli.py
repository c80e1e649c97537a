"""The `slimctl` command line: each command parses options, calls the library once, renders the result.

stdout carries data (tables, or exactly one JSON document with --json); stderr carries progress and
errors. Nothing here imports torch at module level, so `slimctl --help` stays fast.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, List, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, SlimctlError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    help="Slim Hugging Face models (quantize, prune) and prove it: eval, bench, gates, report, reloadable artifact.\n\n"
         "Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 internal error, 130 interrupted.",
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

# Options shared by several commands, defined once.
JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
OUT_OPT = typer.Option(..., "--out", "-o", help="Output folder: report.json, report.md and model/ go here.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace a previous slimctl output in --out.")
SEED_OPT = typer.Option(0, "--seed", help="Seed for every random choice (data order, calibration).")
MAX_SAMPLES_OPT = typer.Option(None, "--max-samples", help="Eval on at most N samples (documents / texts).")
INLINE_OPT = typer.Option(False, "--inline", help="Bench in this process instead of a fresh one (debugging).")
SKIP_EVAL_OPT = typer.Option(False, "--skip-eval", help="Do not evaluate accuracy.")
SKIP_BENCH_OPT = typer.Option(False, "--skip-bench", help="Do not benchmark speed and memory.")
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu or cuda.")
PICKLE_OPT = typer.Option(False, "--allow-pickle", help="Load pickle-only weights (torch.load weights_only=True); refused by default.")
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Run custom modelling code a model folder asks for; off by default.")
COMPILE_OPT = typer.Option(None, "--compile", help="Causal LMs: also decode on a static KV cache under torch.compile (CUDA "
                           "graphs on GPU). true: report it; auto: the faster of eager and compiled; false: eager only.")


def _compile_flag(value: Optional[str]):
    """--compile VALUE as the recipe's bench.compile: True, False or "auto" (None: keep the recipe's)."""
    if value is None:
        return None
    v = value.strip().lower()
    table = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False,
             "auto": "auto"}
    if v not in table:
        from .errors import UsageError

        raise UsageError(f"--compile takes auto, true or false, not {value!r}")
    return table[v]


class _UI:
    """Progress to stderr: a line per step and a bar per long loop (hidden when stderr is not a TTY)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            err.print(f"[dim]• {msg}[/dim]")

    def track(self, it: Iterable, desc: str, total: int) -> Iterable:
        if self.quiet or not err.is_terminal:
            return it
        from rich.progress import track

        return track(it, description=desc, total=total, console=err, transient=True)

    def pipeline_ui(self):
        from .pipeline import UI

        return UI(say=self.say, track=self.track)


def _emit(data: Any, as_json: bool, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        human(data)


def _print_run(report: dict) -> None:
    from .report import markdown

    out.print(markdown(report), markup=False)
    out.print(f"report:   {Path(report['artifact']['path']).parent / 'report.json'} (and report.md)", markup=False)
    out.print(f"artifact: {report['artifact']['path']} (loads with {report['artifact']['loads_with']})", markup=False)


def _load_opts(allow_pickle: bool, trust_remote_code: bool) -> dict:
    return {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}


def _run_recipe(recipe, model: str, out_dir: Path, overwrite: bool, inline: bool, as_json: bool, source: str | None,
                load_options: dict, ci=None):
    from . import gates, pipeline
    from .errors import GateFailed

    try:
        report = pipeline.run(recipe, model, out_dir, overwrite=overwrite, isolate=not inline,
                              ui=_UI().pipeline_ui(), recipe_source=source, load_options=load_options)
    except GateFailed as e:
        report = e.report
    if ci is not None:
        from . import ci as ci_mod

        report = ci_mod.apply(report, ci, out_dir)
    _emit(report, as_json, _print_run)
    failed = gates.failures(report["gates"])
    if failed:
        raise GateFailed(failed)


# Regression gates and CI outputs, shared by `run` and `gate`.
BASELINE_OPT = typer.Option(None, "--baseline", help="An earlier report.json: gate this run's slimmed model against its slimmed model.")
PRESET_OPT = typer.Option(None, "--preset", help="mlperf-99 or mlperf-99.9: accuracy at least 99 % / 99.9 % of the baseline report's.")
MIN_QUALITY_OPT = typer.Option(None, "--min-quality", help="Accuracy as a fraction of the baseline report's (perplexity: old/new), e.g. 0.98.")
MAX_LAT_OPT = typer.Option(None, "--max-latency-increase", help="Allowed p50 latency increase over the baseline report, % (noise-aware).")
MAX_MEM_OPT = typer.Option(None, "--max-memory-increase", help="Allowed peak-memory increase over the baseline report, %.")
MAX_SIZE_OPT = typer.Option(None, "--max-size-increase", help="Allowed size increase over the baseline report, %.")
JUNIT_OPT = typer.Option(None, "--junit", help="Write the gates as JUnit XML here (one test case per gate).")
HTML_OPT = typer.Option(None, "--html", help="Write a self-contained HTML report here.")


def _ci(baseline, preset, min_quality, max_lat, max_mem, max_size, junit, html):
    from .ci import CIOptions, read_report
    from .errors import UsageError
    from .gates import PRESETS

    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if baseline is not None:
        read_report(baseline)  # a bad baseline fails now, not after minutes of work
    return CIOptions(baseline=baseline, preset=preset, min_quality=min_quality, max_latency_increase_pct=max_lat,
                     max_memory_increase_pct=max_mem, max_size_increase_pct=max_size, junit=junit, html=html)


def _spec(cls_name: str, **options):
    """An EvalSpec/BenchSpec from command-line options; a bad value is a usage error naming the option."""
    from pydantic import ValidationError

    from . import recipe
    from .errors import UsageError

    try:
        return getattr(recipe, cls_name).model_validate(options)
    except ValidationError as e:
        raise UsageError("--" + recipe._format_error(e).replace("_", "-")) from None


def _specs(max_samples, skip_eval, skip_bench, device):
    return _spec("EvalSpec", max_samples=max_samples, skip=skip_eval), _spec("BenchSpec", device=device, skip=skip_bench)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    model: str = typer.Option(..., "--model", "-m", help="Built-in name, local HF folder, or hub id."),
    out_dir: Path = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
    max_samples: Optional[int] = MAX_SAMPLES_OPT, seed: Optional[int] = typer.Option(None, "--seed", help="Override the recipe's seed."),
    skip_eval: bool = SKIP_EVAL_OPT, skip_bench: bool = SKIP_BENCH_OPT, inline: bool = INLINE_OPT, as_json: bool = JSON_OPT,
    allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
    baseline: Optional[Path] = BASELINE_OPT, preset: Optional[str] = PRESET_OPT, min_quality: Optional[float] = MIN_QUALITY_OPT,
    max_latency_increase: Optional[float] = MAX_LAT_OPT, max_memory_increase: Optional[float] = MAX_MEM_OPT,
    max_size_increase: Optional[float] = MAX_SIZE_OPT, junit: Optional[Path] = JUNIT_OPT, html: Optional[Path] = HTML_OPT,
    compile_: Optional[str] = COMPILE_OPT,
):
    """Run a recipe: baseline eval+bench, the steps, eval+bench of the result, gates, report, artifact.

    Examples:
    [bold]slimctl run recipes/int8-dynamic.yaml --model minilm-l6 --out runs/minilm-int8 --html runs/minilm-int8/report.html[/bold]
    In CI, against last release's report: [bold]slimctl run recipes/int8-dynamic.yaml -m minilm-l6 -o out --baseline release/report.json --preset mlperf-99 --max-latency-increase 10 --junit gates.xml[/bold]
    """
    from . import recipe as recipe_mod

    comp = _compile_flag(compile_)
    r = recipe_mod.load(recipe)
    r = r.model_copy(update={
        "eval": r.eval.model_copy(update={"max_samples": max_samples or r.eval.max_samples, "skip": r.eval.skip or skip_eval}),
        "bench": r.bench.model_copy(update={"skip": r.bench.skip or skip_bench,
                                            "compile": r.bench.compile if comp is None else comp}),
        "seed": r.seed if seed is None else seed})
    ci = _ci(baseline, preset, min_quality, max_latency_increase, max_memory_increase, max_size_increase, junit, html)
    if (baseline is None) != (not ci.any_limit()):
        from .errors import UsageError

        raise UsageError("--baseline and the limits (--preset, --min-quality, --max-*-increase) go together")
    _run_recipe(r, model, out_dir, overwrite, inline, as_json, str(recipe), _load_opts(allow_pickle, trust_remote_code), ci)


def _set_options(pairs: Optional[List[str]]) -> dict:
    """--set KEY=VALUE pairs; values are read as YAML scalars (0.8, true, null, text)."""
    import yaml

    from .errors import UsageError

    out = {}
    for p in pairs or []:
        key, sep, val = p.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got {p!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(val)
    return out


def _one_step(method: str, options: dict, model: str, out_dir: Path, overwrite: bool, max_samples, skip_eval,
              skip_bench, device, seed, inline, as_json, kinds: tuple[str, ...], load_options: dict):
    from . import recipe as recipe_mod, techniques
    from .errors import UsageError

    tech = techniques.get(method)
    if tech.kind not in kinds:
        names = sorted(n for n, t in techniques.load_all().items() if t.kind in kinds)
        raise UsageError(f"'{method}' is not a method of this command; choose one of: {', '.join(names)}")
    ev, be = _specs(max_samples, skip_eval, skip_bench, device)
    r = recipe_mod.single_step(method, options, ev, be, seed)
    _run_recipe(r, model, out_dir, overwrite, inline, as_json, None, load_options)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Built-in name, local HF folder, or hub id."),
    method: str = typer.Option(..., "--method", help="rtn, gptq, smoothquant, int8-dynamic, bf16, fp16 (see `slimctl methods`)."),
    out_dir: Path = OUT_OPT,
    bits: Optional[int] = typer.Option(None, "--bits", help="rtn/gptq: 4 or 8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="rtn/gptq: columns per scale (32, 64, 128…); 0 = per channel."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="rtn/gptq: use a zero point per group."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other method option as KEY=VALUE (repeatable), e.g. --set alpha=0.8."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Module name pattern to leave alone (repeatable)."),
    overwrite: bool = OVERWRITE_OPT, max_samples: Optional[int] = MAX_SAMPLES_OPT, skip_eval: bool = SKIP_EVAL_OPT,
    skip_bench: bool = SKIP_BENCH_OPT, device: str = DEVICE_OPT, seed: int = SEED_OPT, inline: bool = INLINE_OPT,
    as_json: bool = JSON_OPT, allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
):
    """Quantize or cast a model, measure it against the original and save the artifact.

    Example: [bold]slimctl quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out runs/smol-gptq[/bold]
    """
    opts = _set_options(set_)
    if ignore:
        opts["ignore"] = ignore
    if bits is not None:
        opts["bits"] = bits
    if group_size is not None:
        opts["group_size"] = group_size or None
    if asymmetric:
        opts["symmetric"] = False
    _one_step(method, opts, model, out_dir, overwrite, max_samples, skip_eval, skip_bench, device, seed, inline,
              as_json, ("quantize", "cast"), _load_opts(allow_pickle, trust_remote_code))


@app.command()
def prune(
    model: str = typer.Argument(..., help="Built-in name, local HF folder, or hub id."),
    method: str = typer.Option("magnitude", "--method", help="magnitude, wanda, sparsegpt, structured (see `slimctl methods`)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Unstructured: fraction of weights to zero, in (0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured instead, e.g. 2:4 (N non-zeros kept per M)."),
    scope: Optional[str] = typer.Option(None, "--scope", help="magnitude: layer (default, same sparsity per layer) or global (one threshold)."),
    out_dir: Path = OUT_OPT,
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other method option as KEY=VALUE (repeatable), e.g. --set ffn=0.25."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Module name pattern to leave alone (repeatable)."),
    overwrite: bool = OVERWRITE_OPT, max_samples: Optional[int] = MAX_SAMPLES_OPT, skip_eval: bool = SKIP_EVAL_OPT,
    skip_bench: bool = SKIP_BENCH_OPT, device: str = DEVICE_OPT, seed: int = SEED_OPT, inline: bool = INLINE_OPT,
    as_json: bool = JSON_OPT, allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
):
    """Prune a model, measure it against the original and save the artifact.

    Examples:
    [bold]slimctl prune smollm2-135m --method wanda --sparsity 0.5 --out runs/smol-wanda50[/bold]
    [bold]slimctl prune smollm2-135m --method sparsegpt --pattern 2:4 --out runs/smol-sgpt24[/bold]
    [bold]slimctl prune smollm2-135m --method structured --set ffn=0.25 --out runs/smol-ffn25[/bold]
    """
    opts = _set_options(set_)
    for key, val in (("sparsity", sparsity), ("pattern", pattern), ("scope", scope), ("ignore", ignore)):
        if val is not None:
            opts[key] = val
    _one_step(method, opts, model, out_dir, overwrite, max_samples, skip_eval, skip_bench, device, seed, inline,
              as_json, ("prune",), _load_opts(allow_pickle, trust_remote_code))


@app.command()
def gate(
    report: Path = typer.Argument(..., help="A report.json (or the run folder holding it)."),
    baseline: Optional[Path] = BASELINE_OPT, preset: Optional[str] = PRESET_OPT, min_quality: Optional[float] = MIN_QUALITY_OPT,
    max_latency_increase: Optional[float] = MAX_LAT_OPT, max_memory_increase: Optional[float] = MAX_MEM_OPT,
    max_size_increase: Optional[float] = MAX_SIZE_OPT, junit: Optional[Path] = JUNIT_OPT, html: Optional[Path] = HTML_OPT,
    as_json: bool = JSON_OPT,
):
    """Check an existing report's gates, and optionally gate it against an earlier report. Exit 1 when a gate fails.

    Examples:
    [bold]slimctl gate runs/new/report.json --baseline runs/release/report.json --preset mlperf-99 --max-latency-increase 10[/bold]
    [bold]slimctl gate runs/new --junit gates.xml[/bold]
    """
    from . import ci as ci_mod, gates
    from .errors import GateFailed, UsageError

    opts = _ci(baseline, preset, min_quality, max_latency_increase, max_memory_increase, max_size_increase, junit, html)
    if baseline is None and opts.any_limit():
        raise UsageError("the limits (--preset, --min-quality, --max-*-increase) compare with --baseline; give one")
    rep = ci_mod.read_report(report)
    rep = ci_mod.apply(rep, opts, None)
    rows = rep.get("gates", [])

    def human(rows):
        for g in rows:
            res = {True: "pass", False: "FAIL", None: "n/a "}[g["passed"]]
            val = _fmt_num(g.get("value"))
            out.print(f"{res}  {g['name']:<26} value {val:<10} threshold {g['threshold']:g}  {g.get('note', '')}", markup=False)

    _emit({"report": str(report), "passed": not gates.failures(rows), "gates": rows}, as_json, lambda d: human(d["gates"]))
    failed = gates.failures(rows)
    if failed:
        raise GateFailed(failed)


def _fmt_num(v) -> str:
    return "–" if v is None else f"{v:.4g}"


@app.command("report")
def report_cmd(
    report: Path = typer.Argument(..., help="A report.json (or the run folder holding it)."),
    html: Path = typer.Option(..., "--html", help="Write the self-contained HTML report here."),
):
    """Render a report as one self-contained HTML file (inline SVG plots, no network).

    Example: [bold]slimctl report runs/minilm-int8/report.json --html runs/minilm-int8/report.html[/bold]
    """
    from . import ci as ci_mod
    from .html import render

    ci_mod._write(html, render([ci_mod.read_report(report)]))
    out.print(f"wrote {html}", markup=False)


@app.command()
def compare(
    reports: List[Path] = typer.Argument(..., help="Two or more report.json files (or run folders)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also draw the comparison as a self-contained HTML file."),
    as_json: bool = JSON_OPT,
):
    """One table across runs; the Pareto-optimal ones (no other run is both faster and more accurate) are marked.

    Example: [bold]slimctl compare runs/*/report.json --html compare.html[/bold]
    """
    from . import ci as ci_mod
    from .html import label, pareto, point, render

    reps = [ci_mod.read_report(p) for p in reports]
    pts = [point(reps[0], "baseline")] + [point(r) for r in reps]
    front = pareto(pts)
    names = ["baseline"] + [label(r) for r in reps]
    rows = [{"name": n, "source": str(src) if src else None, "metric": p["metric"], "value": p["value"], "latency_p50_ms": p["latency"],
             "size_mb": p["size"], "peak_memory_mb": p["memory"], "passed": (r or {}).get("passed"), "pareto": f}
            for n, p, f, r, src in zip(names, pts, front, [None] + reps, [None] + list(reports))]
    if html is not None:
        ci_mod._write(html, render(reps))

    def human(rows):
        out.print(f"{'run':<28} {'metric':<16} {'value':>10} {'p50 ms':>10} {'size MB':>9} {'peak MB':>9}  pareto", markup=False)
        for r in rows:
            out.print(f"{r['name'][:28]:<28} {str(r['metric'])[:16]:<16} {_fmt_num(r['value']):>10} {_fmt_num(r['latency_p50_ms']):>10} "
                      f"{_fmt_num(r['size_mb']):>9} {_fmt_num(r['peak_memory_mb']):>9}  {'*' if r['pareto'] else ''}", markup=False)
        if html is not None:
            out.print(f"wrote {html}", markup=False)

    _emit({"runs": rows}, as_json, human)


@app.command()
def search(
    model: str = typer.Argument(..., help="Built-in name, local HF folder, or hub id."),
    more: Optional[List[Path]] = typer.Argument(None, hidden=True),  # the rest of a shell glob: --candidates recipes/*.yaml
    max_drop: str = typer.Option(..., "--max-drop", help="Accuracy budget: 1% or 0.01 (perplexity increase, accuracy drop, or 1 - fidelity)."),
    out_dir: Path = OUT_OPT,
    metric: Optional[str] = typer.Option(None, "--metric", help="ppl, accuracy or fidelity (default: ppl for causal LMs, fidelity for encoders)."),
    objective: str = typer.Option("latency", "--objective", help="latency, throughput, size, memory or cost."),
    candidates: Optional[List[Path]] = typer.Option(None, "--candidates", help="Candidate recipes: files or a folder of .yaml (recipes/*.yaml works); default: the built-in space."),
    space: Optional[str] = typer.Option(None, "--space", help="default: the built-in space (also alongside --candidates); none: only --candidates."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop starting new candidates after this long."),
    mixed: int = typer.Option(1, "--mixed", help="1: add mixed-precision candidates from per-block sensitivity; 0: do not."),
    max_samples: Optional[int] = MAX_SAMPLES_OPT, device: str = DEVICE_OPT, seed: int = SEED_OPT, as_json: bool = JSON_OPT,
    allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
):
    """Find the recipe that is best on an objective and stays within an accuracy budget, by measurement.

    A pre-filter on a few batches drops hopeless candidates; per-block sensitivity adds mixed-precision
    candidates (the most sensitive blocks kept in float); the rest run in full, isolated, cached in
    --out so a re-run resumes. Exit 1 when no candidate meets the budget (the closest is named).

    Candidates are ranked on the objective as a ratio to the original model, which every candidate's
    run measures in alternating rounds beside it (the machine's speed drifts between candidates).

    Example: [bold]slimctl search minilm-l6 --max-drop 1% --objective latency --out runs/search-minilm[/bold]

    Example: [bold]slimctl search smollm2-135m --max-drop 1% --candidates recipes/*.yaml --space default --out runs/s[/bold]
    """
    from .errors import GateFailed, UsageError
    from .search import parse_drop, read_candidates, run_search

    budget = parse_drop(max_drop)
    if space not in (None, "default", "none"):
        raise UsageError(f"--space takes default or none, not {space!r}")
    if space == "none" and not candidates:
        raise UsageError("--space none needs --candidates")
    if more and not candidates:
        raise UsageError(f"unexpected argument(s) after the model: {' '.join(map(str, more))}")
    cands = read_candidates(list(candidates) + list(more or [])) if candidates else None
    ev, be = _specs(max_samples, False, False, device)
    ui = _UI()
    res = run_search(model, out_dir, budget, metric, objective, cands, budget_minutes, device, seed, mixed,
                     _load_opts(allow_pickle, trust_remote_code), ui.say, eval_spec=ev, bench_spec=be,
                     with_space=space == "default")

    def human(r):
        p = lambda t: out.print(t, markup=False)
        p(f"search on {r['model']}: {r['metric']} drop <= {r['max_drop']:.2%}, objective {r['objective']} "
          f"({'lower' if r['lower_is_better'] else 'higher'} is better), {r['seconds'] / 60:.1f} min")
        p(f"ranked by {r['ranked_by']}")
        p(f"{'candidate':<34} {'status':<11} {'pre-drop':>9} {'drop':>9} {r['objective']:>12} {'vs orig':>8}  budget  pareto")
        for c in r["candidates"]:
            vs = c.get("vs_original")
            why = c["error"] or ""
            if c.get("same_as"):
                why = f"same steps as {c['same_as']}" + (f"; {why}" if why else "")
            p(f"{c['name'][:34]:<34} {c['status']:<11} {_pct(c.get('prefilter_drop')):>9} {_pct(c.get('drop')):>9} "
              f"{_fmt_num(c.get('objective')):>12} {('–' if vs is None else f'{vs:.2f}x'):>8}  "
              f"{'yes' if c.get('meets_budget') else ('no' if 'meets_budget' in c else '–'):<6}  "
              f"{'*' if c.get('pareto') else ' '}{'  ' + why if why else ''}")
        for w in r.get("warnings") or []:
            p(f"warning: {w}")
        if r["winner"]:
            p(f"winner: {r['winner']} → {out_dir}/winner.yaml, {out_dir}/model, {out_dir}/report.json")
    _emit(res, as_json, human)
    if not res["winner"]:
        c = res.get("closest")
        why = (f"the closest is {c['name']}, {c['drop']:.2%} drop, over the budget by {c['missed_by']:.2%}" if c
               else "no candidate finished")
        raise GateFailed([f"no candidate meets {res['metric']} drop <= {res['max_drop']:.2%}; {why}"])


def _pct(v) -> str:
    return "–" if v is None else f"{v:.2%}"


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Built-in name, local HF folder (an artifact too), or hub id."),
    data: Optional[Path] = typer.Option(None, "--data", help=".txt or .jsonl ('text', and 'label' for classifiers). A causal LM "
                                        "reads a .txt as one token stream; encoders read its paragraphs. Default: held-out BBC News."),
    against: Optional[str] = typer.Option(None, "--against", help="Baseline model: adds top-1 agreement, KL, cosine."),
    max_samples: Optional[int] = MAX_SAMPLES_OPT,
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length (perplexity) or truncation length."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Causal LM: score at most N tokens (default 16384)."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="lm-evaluation-harness task: a name, a task YAML over local "
                                             "files, or bbc-topic (built in, offline). Repeat for several."),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", help="At most N documents per task."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: weight-only int4/int8 layers on fused kernels with bf16 "
                                "activations where the CPU has them (as `bench` runs them); off: the dequantize path."),
    seed: int = SEED_OPT, as_json: bool = JSON_OPT, allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
):
    """Measure accuracy: perplexity (causal LM), embedding fidelity and topic accuracy (encoder), accuracy (classifier),
    and lm-eval task accuracy with --task.

    Example: [bold]slimctl eval runs/smol-bf16/model --against smollm2-135m --max-samples 8[/bold]

    Example: [bold]slimctl eval smollm2-135m --data book.txt[/bold]   (one token stream, up to 16,384 tokens)

    Example: [bold]slimctl eval runs/smol-int4/model --against smollm2-135m --task bbc-topic --task my-task.yaml[/bold]
    """
    from .errors import UsageError
    from .evaluate import evaluate, prepare_tasks
    from .models import load
    ui = _UI()
    spec = _spec("EvalSpec", data=str(data) if data else None, max_samples=max_samples, seq_len=seq_len,
                 max_tokens=max_tokens, tasks=task or None, task_limit=task_limit)
    if kernels not in ("auto", "off"):
        raise UsageError(f"--kernels takes auto or off, not {kernels!r}")
    if data:
        from .evaluate.data import read_file

        read_file(data)  # bad data fails before a model loads
    opts = _load_opts(allow_pickle, trust_remote_code)
    m = load(model, progress=ui.say, **opts)
    taskset = prepare_tasks(m.kind, spec)
    ref = load(against, progress=ui.say, **opts) if against else None
    if ref is not None and ref.kind != m.kind:
        raise UsageError(f"--against {against} is a {ref.kind} model but {model} is a {m.kind} model")
    from .kernels import maybe_accelerate

    plans = [maybe_accelerate(x.model, kernels, kind=x.kind) for x in (m, ref) if x is not None]
    ev = evaluate(m.model, m.tokenizer, m.kind, spec, reference=ref.model if ref else None, seed=seed, track=ui.track,
                  taskset=taskset)
    result = {"model": model, "against": against, **ev.to_dict(), "kernels": plans[0]}
    if plans[0] and plans[0]["warning"]:
        ev.warnings.append(plans[0]["warning"])
    for w in ev.warnings:
        err.print(f"[yellow]Warning:[/yellow] {w}", markup=True, highlight=False)
    _emit(result, as_json, _print_eval)


def _print_eval(r: dict) -> None:
    n = (r.get("settings") or {}).get("tokens_scored")
    out.print(f"{r['model']} ({r['kind']}) on {r['dataset']}" + (f", {n:,} tokens scored" if n else ""), markup=False)
    for k, v in (r["metrics"] or {}).items():
        out.print(f"  {k}: {v:.6g}", markup=False)
    for k, v in (r["vs_reference"] or {}).items():
        out.print(f"  {k} vs {r['against']}: {v:.6g}", markup=False)
    for name, t in (r.get("tasks") or {}).items():
        out.print(f"  task {name} ({t['samples']} docs, {t['source']}):", markup=False)
        for k, v in t["metrics"].items():
            if k.endswith("_stderr"):
                continue
            se = t["metrics"].get(f"{k}_stderr")
            line = f"    {k}: {v:.4f}" + (f" ± {se:.4f}" if se is not None else "")
            if t.get("reference_metrics", {}).get(k) is not None:
                line += f"   ({r['against']}: {t['reference_metrics'][k]:.4f})"
            out.print(line, markup=False)
        if t.get("drop_pct") is not None:
            out.print(f"    {t['primary']} drop vs {r['against']}: {t['drop_pct']:+.2f}%", markup=False)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Built-in name, local HF folder (an artifact too), or hub id."),
    config: Optional[str] = typer.Option(None, "--config", help="Instead of a model: a config.json or llama-1b / llama-8b / smollm2-1.7b, random weights."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, or cpu,cuda: measure on both and say where it is cheaper (placement)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: 1 for causal LMs, 8 otherwise."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Sweep: 1,4,16 or auto (double until memory or throughput runs out)."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Sweep dtypes too: fp32,bf16,fp16 (cast before measuring)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Prompt / input length in tokens (default 128)."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Causal LM: greedy tokens generated per request."),
    min_iters: int = typer.Option(10, "--min-iters", help="Measure at least this many iterations…"),
    min_seconds: float = typer.Option(3.0, "--min-seconds", help="…and for at least this long."),
    repeats: int = typer.Option(3, "--repeats", help="Fresh-process rounds of a single-point bench; the p50 spread is reported."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="MB a point may use (CPU: plays device memory; over it = out of memory)."),
    slo_p95_ms: Optional[float] = typer.Option(None, "--slo-p95-ms", help="Recommend the highest throughput whose p95 latency meets this."),
    hourly_cost: Optional[str] = typer.Option(None, "--hourly-cost", help="USD per hour for cost per 1M tokens: 0.10, or cpu=0.68,cuda=3.50 (default: marked examples)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    semi_structured: bool = typer.Option(False, "--semi-structured", help="CUDA, fp16/bf16: run 2:4-pruned Linear layers on sparse tensor cores."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: weight-only int4/int8 layers on fused kernels (bf16 activations) "
                                "where the device has them; off: the dequantize path."),
    compile_: Optional[str] = COMPILE_OPT,
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="With --config: also measure this data-free recipe's slimmed variant (int4-rtn, int8-dynamic, nf4…)."),
    inline: bool = INLINE_OPT, as_json: bool = JSON_OPT, allow_pickle: bool = PICKLE_OPT, trust_remote_code: bool = REMOTE_OPT,
):
    """Measure latency percentiles, throughput, peak memory, % of roofline and cost (prefill and decode for causal LMs).

    Each measurement runs in a fresh process. Examples:
    [bold]slimctl bench smollm2-135m --hourly-cost 0.10[/bold]
    [bold]slimctl bench minilm-l6 --batch-sizes auto --json[/bold]
    [bold]slimctl bench --config llama-1b --dtypes fp32,bf16 --batch-sizes 1,4 --seq-len 64 --decode-tokens 8[/bold]
    [bold]slimctl bench --config llama-1b --device cpu,cuda --slo-p95-ms 2000 --hourly-cost cpu=0.68,cuda=3.50[/bold]
    [bold]slimctl bench --config llama-8b --recipe recipes/int4-rtn-g128.yaml --seq-len 32 --decode-tokens 8 --repeats 1[/bold]
    """
    from .bench.sweep import data_free_steps, parse_hourly, parse_sizes, study_devices
    from .errors import UsageError

    if (model is None) == (config is None):
        raise UsageError("give a MODEL or --config, not both or neither")
    sizes = parse_sizes(batch_sizes) if batch_sizes else None
    dts = [d.strip() for d in dtypes.split(",")] if dtypes else None
    if dts and any(d not in ("fp32", "bf16", "fp16") for d in dts):
        raise UsageError(f"--dtypes takes fp32, bf16, fp16; got {dtypes}")
    if repeats < 1 or repeats > 100:
        raise UsageError("--repeats must lie in 1..100")
    devices = [d.strip() for d in device.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices) or any(d not in ("cpu", "cuda") for d in devices):
        raise UsageError(f"--device takes cpu, cuda or cpu,cuda; got {device!r}")
    prices = parse_hourly(hourly_cost, devices)
    if recipe is not None and config is None:
        raise UsageError("--recipe measures a slimmed variant of a --config architecture; for a real model use slimctl run")
    steps = data_free_steps(str(recipe)) if recipe is not None else None
    if "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            from .errors import DeviceError

            raise DeviceError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    ui = _UI()
    specs = {dev: _spec("BenchSpec", device=dev, batch_size=batch_size, seq_len=seq_len, decode_tokens=decode_tokens,
                        min_iters=min_iters, min_seconds=min_seconds, threads=threads, semi_structured=semi_structured,
                        kernels=kernels, compile=_compile_flag(compile_) or False)
             for dev in devices}
    result = study_devices(config or model, specs, prices, config_only=config is not None, sizes=sizes, dtypes=dts,
                           max_memory_mb=max_memory, slo_p95_ms=slo_p95_ms, repeats=repeats, inline=inline,
                           load_options=_load_opts(allow_pickle, trust_remote_code), steps=steps,
                           recipe=str(recipe) if recipe else None, say=ui.say)
    _emit(result, as_json, _print_bench)


def _print_bench(r: dict) -> None:
    p = lambda text: out.print(text, markup=False)
    if "by_device" in r:
        for sub in r["by_device"].values():
            _print_bench(sub)
        p(f"placement: {r['placement']['line']}")
        return
    if r.get("slimmed"):
        _print_bench({k: v for k, v in r.items() if k != "slimmed"})
        p(f"slimmed variant ({r['slimmed']['recipe']}):")
        _print_bench(r["slimmed"])
        v = r["slimmed"]["vs_baseline"]
        if v:
            p(f"  vs baseline: request {v['speedup']:.2f}x" + (f", decode {v['decode_speedup']:.2f}x, prefill {v['prefill_speedup']:.2f}x"
              if "decode_speedup" in v else "") + f", weights {v['weights_ratio']:.2f}x, peak memory {v['peak_memory_ratio']:.2f}x"
              + (" (within noise)" if v.get("within_noise") else ""))
        return
    if r.get("config_only"):
        c = r["config_only"]
        p(f"{c['architecture']}: {(c['parameters'] or 0) / 1e9:.2f} B parameters, random weights (speed and memory only)")
    if r.get("sweep"):
        p(f"{'batch':>6} {'dtype':>10} {'p50 ms':>9} {'p95 ms':>9} {'samples/s':>10} {'tokens/s':>10} {'peak MB':>8}  status")
        for s in r["sweep"]:
            if s["status"] == "ok":
                p(f"{s['batch_size']:>6} {s['dtype']:>10} {s['p50_ms']:>9.1f} {s['p95_ms']:>9.1f} {s['samples_per_s']:>10.2f} "
                  f"{s['tokens_per_s']:>10.1f} {s['peak_memory_mb']:>8.0f}  ok")
            else:
                p(f"{s['batch_size']:>6} {s['dtype']:>10} {'':>9} {'':>9} {'':>10} {'':>10} {'':>8}  {s['status']}: {s.get('error', '')}")
        rec = r.get("recommendation")
        if rec:
            p(f"recommended: batch {rec['batch_size']} ({rec['dtype']}): {rec['reason']}")
    b = r.get("bench")
    if b:
        lat = b["latency_ms"]
        p(f"{r['model']} ({r['kind']}) on {b['device']}, {b['threads']} threads, batch {b['batch_size']} x {b['seq_len']}, {b['dtype']}")
        spread = b.get("spread_p50_ms")
        p(f"  {b['latency_of']} latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  (n={lat['count']})"
          + (f"; p50 of {len(b['rounds_p50_ms'])} fresh-process rounds {spread[0]:.2f}-{spread[1]:.2f}" if spread else ""))
        if "prefill_ms" in b:
            p(f"  prefill p50 {b['prefill_ms']['p50']:.2f} ms ({b['prefill_tokens_per_s']:.0f} tok/s)   decode {b['decode_tokens_per_s']:.1f} tok/s"
              + (f" ({b['decode_mode']})" if b.get("decode_mode") else ""))
            for mode, m in (b.get("modes") or {}).items():
                p(f"    {mode:<8} request p50 {m['latency_ms']['p50']:.1f} ms, decode {m['decode_tokens_per_s']:.1f} tok/s"
                  + (f", compiled in {m['compile_seconds']:.0f} s (not in any latency)" if m.get("compile_seconds") else ""))
        if b.get("kernels"):
            k = b["kernels"]
            p(f"  kernels: {k['fused_layers']} fused ({', '.join(f'{n} {c}' for c, n in k['kernels'].items()) or 'none'}), "
              f"{k['dequantize_layers']} dequantize; {k['act_dtype']} activations")
        p(f"  throughput {b['throughput']['samples_per_s']:.2f} samples/s, {b['throughput']['tokens_per_s']:.1f} tokens/s")
        p(f"  peak memory {b['peak_memory_mb']:.0f} MB   size {b['size_mb']:.1f} MB")
        rf = b.get("roofline") or {}
        if "decode_pct_of_bandwidth_floor" in rf:
            p(f"  roofline: decode at {rf['decode_pct_of_bandwidth_floor']:.0f}% of the bandwidth floor ({rf['decode_floor_ms']:.2f} ms/step at "
              f"{rf['bandwidth_gb_s']:.1f} GB/s); prefill at {rf['prefill_pct_of_compute_floor']:.0f}% of the compute floor "
              f"({rf['matmul_tflops']:.2f} TFLOP/s {rf['peaks_dtype']})")
        elif "forward_pct_of_compute_floor" in rf:
            p(f"  roofline: forward at {rf['forward_pct_of_compute_floor']:.0f}% of the compute floor ({rf['matmul_tflops']:.2f} TFLOP/s {rf['peaks_dtype']})")
    c = r.get("cost")
    if c:
        unit = "1M tokens" if "usd_per_1m_tokens" in c else "1M samples"
        val = c.get("usd_per_1m_tokens", c.get("usd_per_1m_samples"))
        p(f"  cost: {val:.4g} USD per {unit} ({c['basis']}; {c['assumption']})")
    for w in r.get("warnings") or []:
        p(f"warning: {w}")


@app.command()
def models(as_json: bool = JSON_OPT):
    """List the built-in models and whether they are ready to use offline.

    Example: [bold]slimctl models --json[/bold]
    """
    from .models import BUILTINS, builtin_status

    rows = [{"name": b.name, "status": builtin_status(b.name), "summary": b.summary} for b in BUILTINS.values()]

    def human(rs):
        for r in rs:
            out.print(f"{r['name']:<14} {r['status']:<50} {r['summary']}", markup=False)
    _emit(rows, as_json, human)


@app.command()
def methods(as_json: bool = JSON_OPT):
    """List the slimming methods, what they do and what reloads their artifacts.

    Example: [bold]slimctl methods[/bold]
    """
    from .techniques import load_all

    rows = [{"name": t.name, "kind": t.kind, "summary": t.summary, "options": sorted(t.config.model_fields)}
            for t in sorted(load_all().values(), key=lambda t: (t.kind, t.name))]

    def human(rs):
        for r in rs:
            out.print(f"{r['name']:<18} {r['kind']:<9} {r['summary']}", markup=False)
    _emit(rows, as_json, human)


@app.command()
def verify(out_dir: Path = typer.Argument(..., help="A slimctl output folder (holds report.json and model/).")):
    """Re-hash the artifact's files against its report; exit 1 on any mismatch.

    Example: [bold]slimctl verify runs/minilm-int8[/bold]
    """
    from .errors import DataError, GateFailed
    from .models import file_digest

    rep = out_dir / "report.json"
    if not rep.exists():
        raise DataError(f"{rep} does not exist; pass a folder written by slimctl run/quantize/prune")
    try:
        files = json.loads(rep.read_text())["artifact"]["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{rep} is not a slimctl report") from None
    art = out_dir / "model"
    bad = []
    for f in files:
        p = art / f["name"]
        if not p.exists():
            bad.append(f"{f['name']} missing")
        elif file_digest(p) != f["sha256"]:
            bad.append(f"{f['name']} changed")
    if bad:
        raise GateFailed(bad)
    out.print(f"ok: {len(files)} files match {rep}", markup=False)


def _version(value: bool):
    if value:
        out.print(f"slimctl {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes; Typer >= 0.26 carries a private copy of Click."""
    import importlib

    usage, abort = [], []
    for name in ("typer._click", "click"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        exc = getattr(mod, "exceptions", mod)
        usage += [c for c in (getattr(mod, "ClickException", None),) if c]
        abort += [c for c in (getattr(exc, "Abort", None),) if c]
    return tuple(usage), tuple(abort)


def _out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's CPU allocator failing under a memory cap, or CUDA OOM."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def main() -> None:
    """Entry point: renders every error as one `Error:` line and the documented exit code."""
    import signal

    click_usage, click_abort = _click_exceptions()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, fail the write (EFBIG) instead of dying
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    debug = os.environ.get("SLIMCTL_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
        if rc == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into a silent Exit(130)
            err.print("Error: interrupted; no partial artifact was left", markup=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except SlimctlError as e:
        from .errors import GateFailed

        if isinstance(e, GateFailed):
            for f in e.failed:
                err.print(f"FAIL {f}", markup=False, soft_wrap=True)
        if debug:
            traceback.print_exc()
        err.print(f"Error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except click_abort:
        err.print("Error: interrupted", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except click_usage as e:
        err.print(f"Error: {e.format_message()}", markup=False, soft_wrap=True)
        if getattr(e, "ctx", None) is not None:
            err.print(f"Try '{e.ctx.command_path} --help'.", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("Error: interrupted; no partial artifact was left", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # out of memory is the user's limit; anything else is a bug: say so plainly
        if _out_of_memory(e):
            err.print("Error: out of memory; try a smaller --batch-size or --seq-len, or fewer calibration samples "
                      "(--set calib_samples=16)", markup=False, soft_wrap=True)
            sys.exit(2)
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(f"Error: internal error ({type(e).__name__}: {first[:300]}); rerun with SLIMCTL_DEBUG=1 for the traceback",
                  markup=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
