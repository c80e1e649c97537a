"""One slimming run: load → apply steps → eval side by side → save artifact → reload check →
bench baseline and slimmed (each in a fresh process) → gates → report."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__, gates as gate_mod, report as report_mod
from .errors import GateFailed, OutputError
from .recipe import Recipe

ARTIFACT_DIR = "model"
RELOAD_TOLERANCE = 1e-5  # the reloaded artifact must reproduce the in-memory outputs (0 for integer formats)
OWNED = ("model", "report.json", "report.md")  # what slimctl writes into --out, and so may replace


@dataclass
class UI:
    say: Callable[[str], None] = lambda msg: None
    track: Callable[[Iterable, str, int], Iterable] = lambda it, desc, total: it


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty --out unless --overwrite; check it is writable before any long work."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    if out.is_dir():
        clean_partial(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {out} exists and is not empty; pass --overwrite or choose a new folder")
        foreign = [p.name for p in out.iterdir() if p.name not in OWNED and not p.name.startswith(".")]
        if foreign:
            raise OutputError(f"--out {out} holds files slimctl did not write ({foreign[0]}, …); choose an empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to --out {out}: {e.strerror}") from None


def apply_steps(model, tokenizer, recipe: Recipe, kind: str, ui: UI) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """Apply each step in order; record its own stats plus seconds and peak RSS while it ran.
    Returns the slimmed model (a step may replace it, e.g. by an ONNX Runtime one), stats, notes."""
    from . import techniques
    from .bench.measure import PeakMemory, release_freed_memory, rss_mb

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


def reload_check(slim, folder: Path, tokenizer, kind: str) -> dict[str, Any]:
    """Load the artifact back from disk and compare its outputs with the in-memory slimmed model."""
    import torch

    from .models import CAUSAL_LM, load

    again = load(str(folder))
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


def _delta(ev: dict | None, bb: dict | None, sb: dict | None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if ev:
        agree = ev.get("vs_reference") or {}
        d.update({k: v for k, v in agree.items()})
        if "perplexity_ratio" in agree:
            d["perplexity_increase_pct"] = (agree["perplexity_ratio"] - 1) * 100
        d["fidelity"] = agree.get("mean_cosine", agree.get("top1_agreement"))
        d["tokens_scored"] = (ev.get("settings") or {}).get("tokens_scored")
        if ev.get("tasks"):
            from .evaluate.tasks import max_drop_pct

            d["task_drop_pct"] = max_drop_pct(ev["tasks"])
        ref, cur = ev.get("reference_metrics") or {}, ev.get("metrics") or {}
        for k in ("topic_accuracy", "accuracy"):
            if k in ref and k in cur:
                d[f"{k}_change"] = cur[k] - ref[k]
    if bb and sb:
        d["speedup"] = bb["latency_ms"]["p50"] / sb["latency_ms"]["p50"]
        rounds = list(zip(bb.get("rounds_p50_ms", []), sb.get("rounds_p50_ms", [])))
        if len(rounds) > 1:  # each round's ratio; a range that straddles 1 means no measurable difference
            ratios = [b / s for b, s in rounds]
            d["speedup_range"] = [min(ratios), max(ratios)]
            d["speedup_within_noise"] = min(ratios) <= 1 <= max(ratios)
        d["throughput_ratio"] = sb["throughput"]["samples_per_s"] / bb["throughput"]["samples_per_s"]
        d["peak_memory_ratio"] = sb["peak_memory_mb"] / bb["peak_memory_mb"] if bb["peak_memory_mb"] else None
        if "decode_tokens_per_s" in bb:
            d["decode_speedup"] = sb["decode_tokens_per_s"] / bb["decode_tokens_per_s"]
            d["prefill_speedup"] = bb["prefill_ms"]["p50"] / sb["prefill_ms"]["p50"]
            for mode, base_run in (bb.get("modes") or {}).items():  # the slimmed path vs each baseline path
                d[f"decode_speedup_vs_{mode}_baseline"] = sb["decode_tokens_per_s"] / base_run["decode_tokens_per_s"]
                d[f"speedup_vs_{mode}_baseline"] = base_run["latency_ms"]["p50"] / sb["latency_ms"]["p50"]
    if bb and sb and bb.get("size_mb"):
        d["size_ratio"] = sb["size_mb"] / bb["size_mb"]
    return d


def _warnings(d: dict[str, Any], notes: list[str], slim_bench: dict | None = None) -> list[str]:
    w = list(notes)
    if slim_bench and slim_bench.get("onnx_cpu_fallback"):
        w.append("onnxruntime's CUDA execution provider has no kernel for some nodes of this graph (int8 ops usually): "
                 "they run on the CPU, with copies each way")
    if d.get("speedup_within_noise"):
        lo, hi = d["speedup_range"]
        w.append(f"the speed difference is within run-to-run noise (per-round speedup {lo:.2f}x to {hi:.2f}x)")
    elif d.get("speedup") is not None and d["speedup"] < 1:
        w.append(f"the slimmed model is slower than its baseline ({d['speedup']:.2f}x at p50)")
    if d.get("decode_speedup") is not None and d["decode_speedup"] < 1:
        w.append(f"the slimmed model decodes slower than its baseline ({d['decode_speedup']:.2f}x tokens/s)")
    w.extend((slim_bench or {}).get("notes") or [])  # e.g. compile auto fell back to eager
    return w


def run(recipe: Recipe, model_spec: str, out: str | Path, overwrite: bool = False, isolate: bool = True,
        ui: UI | None = None, recipe_source: str | None = None, load_options: dict | None = None) -> dict[str, Any]:
    """Do the whole run and write report.json/report.md and the artifact into `out`.

    Returns the report; raises GateFailed (exit code 1) after writing everything when a gate fails.
    """
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


def _run(recipe: Recipe, model_spec: str, out: Path, isolate: bool, ui: UI, recipe_source: str | None,
         load_options: dict) -> dict[str, Any]:
    import torch

    from .bench import bench_isolated, bench_model, pool
    from .evaluate import evaluate, prepare_tasks
    from .models import load, save_artifact
    from .qmodules import quantized_modules_meta

    if recipe.eval.data:  # bad data should fail before minutes of work, not after
        from .evaluate.data import read_file

        read_file(recipe.eval.data)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    ui.say(f"loading {model_spec}")
    base = load(model_spec, progress=ui.say, **load_options)
    taskset = None
    if recipe.eval.tasks and not recipe.eval.skip:
        ui.say(f"loading lm-eval tasks {', '.join(recipe.eval.tasks)}")
        taskset = prepare_tasks(base.kind, recipe.eval)
    slim = copy.deepcopy(base.model)
    slim, steps, notes = apply_steps(slim, base.tokenizer, recipe, base.kind, ui)
    from .ctformat import exportable

    fmt = getattr(slim, "artifact_format", "transformers")
    loads_with = ("onnxruntime (model.onnx), or slimctl" if fmt == "onnx"
                  else "transformers + compressed-tensors, or slimctl" if exportable(slim)
                  else "slimctl" if any(s["loads_with"] == "slimctl" for s in steps) else "transformers")
    meta = {"slimctl_version": __version__, "source_model": model_spec, "kind": base.kind, "format": fmt,
            "recipe": recipe.to_dict(), "steps": [{k: v for k, v in s.items() if k in ("method", "options")} for s in steps],
            "loads_with": loads_with, "quantized_modules": quantized_modules_meta(slim)}
    art_dir = out / ARTIFACT_DIR
    ui.say(f"saving artifact to {art_dir}")
    files = save_artifact(base, slim, art_dir, meta)
    ui.say("reloading the artifact to check it matches the model in memory")
    check = reload_check(slim, art_dir, base.tokenizer, base.kind)
    # Accuracy is measured in the configuration the bench measures: the same kernels and activation dtype.
    from .kernels import maybe_accelerate

    kernels = maybe_accelerate(slim, recipe.bench.kernels, kind=base.kind)
    ev = None
    if not recipe.eval.skip:
        ui.say("evaluating baseline and slimmed side by side" + (f" (slimmed: {kernels['act_dtype']} activations, "
                                                                 f"{kernels['fused_layers']} fused layers)" if kernels else ""))
        ev = evaluate(slim, base.tokenizer, base.kind, recipe.eval, reference=base.model, seed=recipe.seed, track=ui.track,
                      taskset=taskset).to_dict()
        ev["kernels"] = kernels
    bb = sb = None
    if not recipe.bench.skip:
        if isolate:
            # Alternate baseline and slimmed rounds so that slow drifts of the machine hit both alike.
            rb, rs = [], []
            for i in range(recipe.bench.repeats):
                ui.say(f"benchmarking baseline, round {i + 1}/{recipe.bench.repeats} (fresh process)")
                rb.append(bench_isolated(str(base.path), recipe.bench, load_options=load_options))
                ui.say(f"benchmarking slimmed artifact, round {i + 1}/{recipe.bench.repeats} (fresh process)")
                rs.append(bench_isolated(str(art_dir), recipe.bench))
            bb, sb = pool(rb), pool(rs)
        else:
            ui.say("benchmarking baseline (inline)")
            bb = bench_model(base.model, base.tokenizer, base.kind, recipe.bench, base.path, ui.say)
            ui.say("benchmarking slimmed (inline)")
            sb = bench_model(slim, base.tokenizer, base.kind, recipe.bench, str(art_dir), ui.say)
    delta = _delta(ev, bb, sb)
    gate_rows = gate_mod.check(recipe.gates.model_dump(), delta)
    gate_rows.append({"name": "artifact_matches_memory", "threshold": RELOAD_TOLERANCE, "value": check["max_abs_diff"],
                      "passed": check["max_abs_diff"] <= RELOAD_TOLERANCE, "sense": "max", "meaning": "max |reloaded - in-memory| output"})
    failed = gate_mod.failures(gate_rows)
    report = {
        "schema": report_mod.SCHEMA,
        "model": {"source": model_spec, "path": base.path, "kind": base.kind},
        "recipe": {**recipe.to_dict(), "source": recipe_source},
        "environment": report_mod.environment(recipe.seed, recipe.bench.device),
        "baseline": {"eval": _side(ev, "reference_metrics"), "bench": bb},
        "slimmed": {"eval": _side(ev, "metrics"), "bench": sb, "steps": steps},
        "delta": delta,
        "gates": gate_rows,
        "passed": not failed,
        "warnings": _warnings(delta, notes + ((ev or {}).get("warnings") or []) + _kernel_warnings(kernels, sb), sb),
        "artifact": {"path": str(art_dir), "loads_with": loads_with, "files": files, "reload_check": check},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report_mod.write(report, out)
    if failed:
        err = GateFailed(failed)
        err.report = report
        raise err
    return report


def _kernel_warnings(eval_plan: dict | None, slim_bench: dict | None) -> list[str]:
    """The dequantize-path count (once), and a mismatch between the eval's and the bench's dtype."""
    plans = [p for p in (eval_plan, (slim_bench or {}).get("kernels")) if p]
    out = []
    if plans and plans[-1].get("warning"):
        out.append(plans[-1]["warning"])
    if eval_plan and slim_bench and slim_bench.get("dtype") and slim_bench["dtype"] != eval_plan["act_dtype"]:
        out.append(f"accuracy was measured with {eval_plan['act_dtype']} activations on the CPU, the bench ran "
                   f"{slim_bench['dtype']} on {slim_bench.get('device')}")
    return out


def _side(ev: dict | None, which: str) -> dict | None:
    if ev is None:
        return None
    side = {k: v for k, v in ev.items() if k not in ("metrics", "reference_metrics")}
    side["metrics"] = ev.get(which)
    if which == "reference_metrics":
        side.pop("vs_reference", None)
        side.pop("kernels", None)
    return side


def clean_partial(out: Path) -> None:
    """Remove temporaries a killed run of slimctl left (it names them; nothing else is touched)."""
    for pattern in (f".{ARTIFACT_DIR}.tmp-*", f".{ARTIFACT_DIR}.old-*", ".report.json.tmp", ".report.md.tmp"):
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
