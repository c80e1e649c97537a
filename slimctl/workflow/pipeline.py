"""One slimming run: load → slim (apply steps) → save and verify (reload check) → evaluate baseline and
slimmed side by side → bench the pair (alternating fresh processes) → gates → report, returned."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError

from ..results import delta as delta_mod, gates as gate_mod, report as R
from ..results.report import EvalResult
from .._version import __version__
from ..errors import OutputError
from ..render import to_json, write_report
from ..steps import UI, apply_steps  # noqa: F401  (UI is part of run()'s interface)
from ..recipe import Recipe

ARTIFACT_DIR = "model"
STRICT_REPORTS = "SLIMCTL_STRICT_REPORTS"  # set (tests): a report that fails its own schema is an error
RELOAD_TOLERANCE = 1e-5  # the reloaded artifact must reproduce the in-memory outputs (0 for integer formats)


def export_files() -> tuple[str, ...]:
    """The file each exporter writes into --out (model.gguf)."""
    from ..formats.exporters import exporters

    return tuple(e.file for e in exporters().values())


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty --out unless --overwrite; check it is writable before any long work."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    if out.is_dir():
        clean_partial(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {out} exists and is not empty; pass --overwrite or choose a new folder")
        owned = (ARTIFACT_DIR, "report.json", "report.md") + export_files()  # what slimctl wrote, and so may replace
        foreign = [p.name for p in out.iterdir() if p.name not in owned and not p.name.startswith(".")]
        if foreign:
            raise OutputError(f"--out {out} holds files slimctl did not write ({foreign[0]}, …); choose an empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to --out {out}: {e.strerror}") from None


def reload_check(slim, folder: Path, tokenizer, kind: str) -> dict[str, Any]:
    """Load the artifact back from disk and compare its outputs with the in-memory slimmed model."""
    import torch

    from ..models import load
    from ..kinds import CAUSAL_LM

    again = load(str(folder), allow_non_finite=True)  # the input's NaN policy was applied at its load; compare as is
    enc = tokenizer(["The artifact measured must be the artifact evaluated.", "Second row, padded."],
                    padding=True, return_tensors="pt")
    with torch.inference_mode():
        outs = []
        for m in (slim, again.model):
            o = m(**enc)
            outs.append(o.logits if kind != "encoder" else o.last_hidden_state)
    a, b = outs
    diff = (a.float() - b.float()).abs().max().item()
    return {"bitwise_equal": bool(torch.equal(a, b)), "max_abs_diff": diff, "dtype": str(b.dtype).replace("torch.", ""),
            "compared": "logits" if kind != "encoder" else "last_hidden_state", "causal": kind == CAUSAL_LM}


def run(recipe: Recipe, model_spec: str, out: str | Path, overwrite: bool = False, isolate: bool = True,
        ui: UI | None = None, recipe_source: str | None = None, load_options: dict | None = None) -> dict[str, Any]:
    """Do the whole run and write report.json/report.md and the artifact into `out`.

    Returns the report (its JSON form, schema slimctl.report/v1); `report["passed"]` is False when a
    gate failed (the CLI exits 1 then). Bad input raises a SlimctlError before anything is written."""
    ui = ui or UI()
    out = Path(out)
    created = not out.exists()
    prepare_output(out, overwrite)
    try:
        return _run(recipe, model_spec, out, isolate, ui, recipe_source, load_options or {})
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty folder of its own making behind
        raise


@dataclass
class Slimmed:
    """The slimmed model in memory, what each step did, and the notes the steps left."""
    model: Any
    steps: list[R.StepRecord]
    notes: list[str]


def _run(recipe: Recipe, model_spec: str, out: Path, isolate: bool, ui: UI, recipe_source: str | None,
         load_options: dict) -> dict[str, Any]:
    import torch

    from ..evaluate import prepare_tasks
    from ..models import load
    from ..techniques.placement import check

    check(recipe.device)  # a missing GPU should fail before minutes of work, not after
    if not recipe.bench.skip:
        check(recipe.bench.device, "the benchmark")
    if recipe.eval.data:  # bad data should fail before minutes of work, not after
        from ..evaluate.data import read_file

        read_file(recipe.eval.data)
    if recipe.stream:
        from ..models import resolve
        from ..stream.skeleton import should_stream

        folder, _ = resolve(model_spec, ui.say)
        if should_stream(recipe.stream, folder):
            return run_streamed(recipe, model_spec, folder, out, ui, recipe_source, load_options)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    ui.say(f"loading {model_spec}")
    base = load(model_spec, progress=ui.say, **load_options)
    if recipe.export is not None:  # an architecture the export refuses fails now, not after the steps
        from ..formats.exporters import exporter

        exporter(recipe.export.format).check(base.model.config, recipe.steps)
    taskset = None
    if recipe.eval.tasks and not recipe.eval.skip:
        ui.say(f"loading lm-eval tasks {', '.join(recipe.eval.tasks)}")
        taskset = prepare_tasks(base.kind, recipe.eval)
    model, steps, notes = apply_steps(copy.deepcopy(base.model), base.tokenizer, recipe, base.kind, ui)
    add_peak_shares(steps)
    slim = Slimmed(model, steps, notes)
    artifact = save_and_verify(base, slim, out / ARTIFACT_DIR, recipe, model_spec, ui)
    if recipe.export is not None:
        artifact.exports = [export_file(base, slim, out, recipe, model_spec, ui)]
    # Accuracy is measured in the configuration the bench measures: the same kernels and activation dtype.
    from ..quant.kernels import maybe_accelerate

    kernels = maybe_accelerate(slim.model, recipe.bench.kernels, kind=base.kind)
    ev = evaluate_pair(base, slim, recipe, kernels, taskset, ui)
    bb, sb = (None, None) if recipe.bench.skip else bench_pair(base, slim, Path(artifact.path), recipe, isolate,
                                                                load_options, ui)
    report = build_report(recipe, model_spec, base, slim, artifact, ev, kernels, bb, sb, recipe_source,
                          round(time.perf_counter() - t_start, 1))
    write_report(report, out)
    return report


def run_streamed(recipe: Recipe, model_spec: str, folder: Path, out: Path, ui: UI, recipe_source: str | None,
                 load_options: dict) -> dict[str, Any]:
    """run() with the model streamed from its files one block at a time (pipeline_streamed.py)."""
    import torch

    from ..machine import RssSampler, release_freed_memory, rss_mb
    from ..models import _load_tokenizer, kind_of
    from .streamed import check_streamable, evaluate_streamed_pair, memory_record, save_and_check
    from ..formats.streamed import open_streamed

    check_streamable(recipe, folder, load_options)
    kind = kind_of(folder)
    tok = _load_tokenizer(folder, load_options.get("trust_remote_code", False))
    t0 = time.perf_counter()
    release_freed_memory()
    start_mb = rss_mb()
    opened = []
    with RssSampler() as rss:
        try:
            from ..families import refuse_streaming
            from ..kinds import read_config

            refuse_streaming(read_config(folder))
            ui.say(f"streaming {model_spec}: one block in memory at a time")
            model, st = open_streamed(folder, kind)
            opened.append(st)
            st.check_finite = not load_options.get("allow_non_finite", False)
            base = SimpleNamespace(model=model, tokenizer=tok, kind=kind, path=str(folder), source=model_spec, meta={})
            torch.manual_seed(recipe.seed)
            model, steps, notes = apply_steps(model, tok, recipe, kind, ui)
            add_peak_shares(steps)
            slim = Slimmed(model, steps, notes)
            artifact, art_model = save_and_check(base, slim, st, out / ARTIFACT_DIR, recipe, model_spec, ui, opened)
            ev = evaluate_streamed_pair(base, art_model, recipe, ui, opened, slim.notes)
        finally:
            for s in opened:
                s.close()
    if not recipe.bench.skip:
        slim.notes.append("speed was not benchmarked: a benchmark loads the whole model, which --stream avoids; "
                          "bench the artifact with slimctl bench on a machine it fits")
    report = build_report(recipe, model_spec, base, slim, artifact, ev, None, None, None, recipe_source,
                          round(time.perf_counter() - t0, 1))
    report["memory"] = memory_record(st, steps, rss, start_mb)
    write_report(report, out)
    return report


def save_and_verify(base, slim: Slimmed, art_dir: Path, recipe: Recipe, model_spec: str, ui: UI) -> R.Artifact:
    """Save the artifact atomically, then load it back and compare its outputs with the model in memory."""
    from ..formats import for_model
    from ..models import save_artifact
    from ..quant.layers import quantized_modules_meta

    from ..families.layer_sizes import has_layer_sizes

    fmt = for_model(slim.model)
    loads_with = "slimctl (per-layer FFN widths)" if has_layer_sizes(slim.model.config) else fmt.loads_with
    meta = {"slimctl_version": __version__, "source_model": model_spec, "kind": base.kind, "format": fmt.name,
            "recipe": recipe.to_dict(), "steps": [s.model_dump(include={"method", "options"}) for s in slim.steps],
            "loads_with": loads_with, "quantized_modules": quantized_modules_meta(slim.model)}
    ui.say(f"saving artifact to {art_dir}")
    files = save_artifact(base, slim.model, art_dir, meta)
    ui.say("reloading the artifact to check it matches the model in memory")
    check = reload_check(slim.model, art_dir, base.tokenizer, base.kind)
    return R.Artifact(path=str(art_dir), loads_with=loads_with, files=files, reload_check=check)


def export_file(base, slim: Slimmed, out: Path, recipe: Recipe, model_spec: str, ui: UI) -> dict[str, Any]:
    """The recipe's export (OUT/model.gguf for llama.cpp) from the slimmed model in memory, by its exporter."""
    from ..formats.exporters import exporter
    from ..models import file_digest

    ex = exporter(recipe.export.format)
    ui.say(f"exporting {ex.file} for {ex.runtime}")
    src = SimpleNamespace(model=slim.model, tokenizer=base.tokenizer, path=str(out / ARTIFACT_DIR), source=model_spec)
    res = ex.write(src, out / ex.file, recipe.export)
    slim.notes.extend(res.notes)
    return ex.report_entry(res, file_digest(Path(res.path)))


def evaluate_pair(base, slim: Slimmed, recipe: Recipe, kernels: dict | None, taskset, ui: UI) -> EvalResult | None:
    """Baseline and slimmed evaluated side by side in one pass (None when the recipe skips eval)."""
    from ..evaluate import evaluate

    if recipe.eval.skip:
        return None
    ui.say("evaluating baseline and slimmed side by side" + (f" (slimmed: {kernels['act_dtype']} activations, "
                                                             f"{kernels['fused_layers']} fused layers)" if kernels else ""))
    return evaluate(slim.model, base.tokenizer, base.kind, recipe.eval, reference=base.model, seed=recipe.seed,
                    track=ui.track, taskset=taskset).result(kernels)


MEASURE_PEAK_AFTER_S = 30.0  # a step this long pays for measuring the matmul peak (~3 s, cached per machine)


def add_peak_shares(steps: list[R.StepRecord]) -> None:
    """Each stage's GFLOP/s as a % of this CPU's measured fp32 matmul peak (bench.roofline's GEMM, cached per
    machine): measured when a step ran long enough to be worth it, else only when already cached."""
    rows = [r for s in steps for r in s.time_breakdown or () if r.gflops_per_s]
    if not rows:
        return
    from ..bench.roofline import cached_peaks, peaks

    long = any((s.seconds or 0) >= MEASURE_PEAK_AFTER_S for s in steps if s.time_breakdown)
    pk = peaks("cpu", "float32") if long else cached_peaks("cpu", "float32")
    if not pk or pk.get("suspect"):
        return
    for r in rows:
        r.pct_of_matmul_peak = round(100 * r.gflops_per_s / (pk["matmul_tflops"] * 1e3), 1)


def bench_pair(base, slim: Slimmed, art_dir: Path, recipe: Recipe, isolate: bool, load_options: dict,
               ui: UI) -> tuple[R.BenchResult, R.BenchResult]:
    """Baseline and slimmed artifact benchmarked in alternating fresh-process rounds (inline: in this
    process, for debugging)."""
    from ..bench import bench_model, pair_isolated

    base_spec = recipe.bench.model_copy(update={"kv_cache": "fp"})  # kv_cache is how the slimmed model decodes
    if isolate:
        return pair_isolated(str(base.path), str(art_dir), recipe.bench, recipe.bench.repeats, ui.say, load_options,
                             base_spec=base_spec)
    ui.say("benchmarking baseline (inline)")
    bb = bench_model(base.model, base.tokenizer, base.kind, base_spec, base.path, ui.say)
    ui.say("benchmarking slimmed (inline)")
    return bb, bench_model(slim.model, base.tokenizer, base.kind, recipe.bench, str(art_dir), ui.say)


def build_report(recipe: Recipe, model_spec: str, base, slim: Slimmed, artifact: R.Artifact, ev: EvalResult | None,
                 kernels: dict | None, bb: R.BenchResult | None, sb: R.BenchResult | None, recipe_source: str | None,
                 seconds: float) -> dict[str, Any]:
    """The report of a run (its JSON form), built from the typed results and validated (report.Report)."""
    plan = R.KernelPlan.model_validate(kernels) if kernels else None
    d = delta_mod.delta(ev, bb, sb)
    gate_rows = gate_mod.check(recipe.gates.model_dump(), d)
    check = artifact.reload_check
    gate_rows.append(R.GateRow(name="artifact_matches_memory", threshold=RELOAD_TOLERANCE, value=check["max_abs_diff"],
                               passed=check["max_abs_diff"] <= RELOAD_TOLERANCE, sense="max",
                               meaning="max |reloaded - in-memory| output"))
    notes = slim.notes + (ev.warnings if ev else []) + delta_mod.kernel_warnings(plan, sb)
    parts = {
        "schema": R.SCHEMA,
        "model": R.ModelInfo(source=model_spec, path=base.path, kind=base.kind),
        "recipe": {**recipe.to_dict(), "source": recipe_source},
        "environment": R.environment(recipe.seed, recipe.bench.device),
        "baseline": R.Side(eval=ev.side(reference=True) if ev else None, bench=bb),
        "slimmed": R.Side(eval=ev.side(reference=False) if ev else None, bench=sb, steps=slim.steps),
        "delta": d,
        "gates": gate_rows,
        "passed": not gate_mod.failures(gate_rows),
        "warnings": delta_mod.warnings(d, notes, sb),
        "artifact": artifact,
        "seconds": seconds,
    }
    try:
        return R.Report.model_validate(parts).to_json()
    except ValidationError as e:
        problem = R.first_error(e)
    if os.environ.get(STRICT_REPORTS):  # the test suite sets it: there a mismatch fails the test
        raise RuntimeError(f"the report does not match the {R.SCHEMA} schema: {problem}")
    # a slimctl bug; the run's results are still worth keeping, so say it rather than fail
    parts["warnings"].append(f"this report does not match the {R.SCHEMA} schema ({problem}); please report it")
    return json.loads(to_json(parts))


def clean_partial(out: Path) -> None:
    """Remove temporaries a killed run of slimctl left (it names them; nothing else is touched)."""
    exported = tuple(f".{name}.tmp-*" for name in export_files())
    for pattern in (f".{ARTIFACT_DIR}.tmp-*", f".{ARTIFACT_DIR}.old-*", ".report.json.tmp", ".report.md.tmp") + exported:
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
