"""`slimctl search`: the best recipe on an objective (latency, throughput, size, memory, cost) within
an accuracy budget, found by measurement: a cheap pre-filter, per-layer sensitivity that yields
mixed-precision candidates, full isolated runs of the survivors (cached, so a re-run resumes), the
Pareto front, and an honest failure when nothing meets the budget."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import gates as gate_mod, recipe as R
from .errors import DataError, GateFailed, UsageError
from .models import CAUSAL_LM, ENCODER

OBJECTIVES = {  # name -> (how to read it from a report, lower is better)
    "latency": (lambda r: (r["slimmed"]["bench"] or {}).get("latency_ms", {}).get("p50"), True),
    "throughput": (lambda r: ((r["slimmed"]["bench"] or {}).get("throughput") or {}).get("samples_per_s"), False),
    "size": (lambda r: (r["slimmed"]["bench"] or {}).get("size_mb"), True),
    "memory": (lambda r: (r["slimmed"]["bench"] or {}).get("peak_memory_mb"), True),
    "cost": (lambda r: 1.0 / t if (t := ((r["slimmed"]["bench"] or {}).get("throughput") or {}).get("samples_per_s")) else None, True),
}
# The same objective as a ratio to the original model measured in the same run (alternating rounds):
# candidates run minutes apart on a machine whose speed drifts, so they are ranked on this ratio.
RATIOS = {  # name -> (ratio from a report's delta, lower is better)
    "latency": lambda d: 1 / d["speedup"] if d.get("speedup") else None,
    "throughput": lambda d: d.get("throughput_ratio"),
    "size": lambda d: d.get("size_ratio"),
    "memory": lambda d: d.get("peak_memory_ratio"),
    "cost": lambda d: 1 / d["throughput_ratio"] if d.get("throughput_ratio") else None,
}
METRICS = ("ppl", "accuracy", "fidelity")
# The pre-filter calibrates on at most this many texts (GPTQ, SparseGPT… cost scales with them); a
# quick drop may differ a little from the full run's, which is why the cut-off sits at 3x the budget
# (and every survivor is measured in full).
PREFILTER_CALIB = 16


def parse_drop(text: str) -> float:
    """'1%' → 0.01, '0.01' → 0.01."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"--max-drop takes a fraction (0.01) or a percentage (1%), not {text!r}") from None
    if not 0 <= v < 1:
        raise UsageError("--max-drop must lie in [0, 100%)")
    return v


def default_metric(kind: str) -> str:
    return {CAUSAL_LM: "ppl", ENCODER: "fidelity"}.get(kind, "accuracy")


def drop(report: dict[str, Any], metric: str) -> float | None:
    """How much the slimmed model lost on `metric`, as a fraction (0.01 = 1 %)."""
    d = report.get("delta") or {}
    if metric == "ppl":
        return None if d.get("perplexity_ratio") is None else d["perplexity_ratio"] - 1
    if metric == "fidelity":
        return None if d.get("fidelity") is None else 1 - d["fidelity"]
    for k in ("accuracy_change", "topic_accuracy_change"):
        if d.get(k) is not None:
            return -d[k]
    return None


def default_space(kind: str) -> list[dict[str, Any]]:
    """Candidate recipes (name, steps) every model kind can take; GPTQ only for causal LMs."""
    space = [("bf16", [{"method": "bf16"}]),
             ("int8-dynamic", [{"method": "int8-dynamic"}]),
             ("w8a8-smoothquant", [{"method": "smoothquant", "alpha": 0.5}]),
             ("int8-weight-only", [{"method": "rtn", "bits": 8, "group_size": None}]),
             ("int4-rtn-g64", [{"method": "rtn", "bits": 4, "group_size": 64}]),
             ("onnx-int8-dynamic", [{"method": "onnx", "quantization": "dynamic"}]),
             ("structured-ffn-25", [{"method": "structured", "ffn": 0.25}])]
    if kind == CAUSAL_LM:
        space.insert(5, ("int4-gptq-g64", [{"method": "gptq", "bits": 4, "group_size": 64, "act_order": True}]))
    return [{"name": n, "steps": s} for n, s in space]


@dataclass
class Candidate:
    name: str
    steps: list[dict[str, Any]]
    origin: str = "space"  # space | file | mixed
    prefilter: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    status: str = "pending"  # pending | dropped | done | failed
    error: str | None = None
    same_as: str | None = None  # measured once under this other candidate's name (identical steps)


def normalize_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step with every option spelled out (defaults filled in), so that the same recipe written
    two ways hashes, caches and deduplicates as one. An unknown method or option is left for the
    candidate's own run to report."""
    from . import techniques

    out = []
    for st in steps:
        try:
            cfg = techniques.get(st["method"]).config(**{k: v for k, v in st.items() if k != "method"})
            out.append({"method": st["method"], **cfg.model_dump()})
        except Exception:  # noqa: BLE001
            out.append(copy.deepcopy(st))
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_hash(folder: Path) -> str:
    """Config plus each weight file's size and mtime: cheap, and changes whenever the weights do."""
    parts = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".onnx")):
            st = p.stat()
            parts.append((p.name, st.st_size, int(st.st_mtime)))
    return _hash(parts)


def _environment(device: str) -> dict[str, Any]:
    from .report import environment

    env = environment(0, device)
    return {k: env.get(k) for k in ("versions", "cpu", "threads", "device", "gpu")}


def _environment_key(device: str) -> str:
    return _hash(_environment(device))


def _recipe(c: Candidate, eval_spec: R.EvalSpec, bench_spec: R.BenchSpec, seed: int) -> R.Recipe:
    return R.from_dict({"version": 1, "name": c.name, "seed": seed, "steps": copy.deepcopy(c.steps),
                        "eval": eval_spec.model_dump(), "bench": bench_spec.model_dump()}, f"candidate {c.name}")


def sensitivity(base, steps: list[dict[str, Any]], metric: str, quick: R.EvalSpec, seed: int, say, groups: int | None = None) -> list[dict[str, Any]]:
    """The metric cost of applying `steps` to one block of the model alone, for every block."""
    from . import techniques
    from .calibrate import find_blocks
    from .evaluate import evaluate

    prefix, blocks = find_blocks(base.model)
    names = [f"{prefix}.{i}" for i in range(len(blocks))][:groups]
    out = []
    for i, blk in enumerate(names):
        slim = copy.deepcopy(base.model)
        ctx = techniques.StepContext(kind=base.kind, seed=seed, tokenizer=base.tokenizer)
        only = [n for n, _ in techniques.select_linears(slim, []) if not n.startswith(blk + ".")]
        slim = _apply_quick(slim, steps, ctx, ignore=only)
        ev = evaluate(slim, base.tokenizer, base.kind, quick, reference=base.model, seed=seed).to_dict()
        d = drop({"delta": _quick_delta(ev)}, metric)
        out.append({"block": blk, "drop": d})
        say(f"sensitivity {i + 1}/{len(names)}: {blk} costs {d:.4f}" if d is not None else f"sensitivity {blk}: n/a")
    return out


def _apply_quick(model, steps: list[dict[str, Any]], ctx, ignore: list[str] | None = None):
    """Apply steps for a quick look (pre-filter, sensitivity): calibration capped at PREFILTER_CALIB
    texts; `ignore` added to every step that can leave layers alone. Returns the (maybe replaced) model."""
    from . import techniques

    for st in steps:
        t = techniques.get(st["method"])
        opts = {k: v for k, v in st.items() if k != "method"}
        if "calib_samples" in t.config.model_fields:
            opts["calib_samples"] = min(opts.get("calib_samples", PREFILTER_CALIB), PREFILTER_CALIB)
        if ignore is not None and "ignore" in t.config.model_fields:
            opts["ignore"] = list(opts.get("ignore", [])) + ignore
        t.apply(model, t.config(**opts), ctx)
        if ctx.replacement is not None:
            model, ctx.replacement = ctx.replacement, None
    return model


def _sensitivity_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps whose per-block cost is measured: GPTQ is measured through RTN at the same bits and
    group (GPTQ per block would cost a full calibration each; its error pattern follows RTN's)."""
    out = []
    for st in steps:
        if st["method"] == "gptq":
            st = {"method": "rtn", "bits": st.get("bits", 4), "group_size": st.get("group_size", 128)}
        out.append(copy.deepcopy(st))
    return out


def _mixable(c: "Candidate", max_drop: float) -> bool:
    """A candidate that missed the budget on the pre-filter by a margin that keeping a few blocks in
    float can plausibly close, and whose last step can leave layers alone (`ignore`)."""
    from . import techniques

    d = c.prefilter.get("drop")
    if d is None or d <= max_drop or d > max(10 * max_drop, 0.05) or not c.steps or c.status not in ("pending", "dropped"):
        return False
    try:
        return "ignore" in techniques.get(c.steps[-1]["method"]).config.model_fields
    except Exception:  # noqa: BLE001
        return False


def mixed_counts(sens: list[dict[str, Any]], total_drop: float, max_drop: float) -> list[int]:
    """How many of the most sensitive blocks to keep in float: the fewest that the measured per-block
    costs say bring the drop under 70 % of the budget (costs taken as additive, scaled to the
    whole-model drop), plus 1/8 and 1/4 of the blocks; never more than half."""
    n = len(sens)
    costs = sorted((max(s["drop"] or 0.0, 0.0) for s in sens), reverse=True)
    total = sum(costs)
    ks = {max(1, n // 8), max(1, n // 4)}
    if total > 0:
        kept = 0.0
        for k, cst in enumerate(costs, 1):
            kept += cst
            if total_drop * (1 - kept / total) <= 0.7 * max_drop:
                ks.add(k)
                break
    return sorted(k for k in ks if k <= max(1, n // 2))


def winner_warnings(winner: dict[str, Any], objective: str, lower: bool) -> list[str]:
    """What a user must hear about a winner ranked on its ratio to the original: that it is worse
    than the original on the objective, or (latency) that its gain lies within the per-round noise."""
    vs = winner["vs_original"]
    if (vs > 1.0) if lower else (vs < 1.0):
        return [f"no candidate within the budget beats the original model on {objective}: the best, {winner['name']}, "
                f"is at {vs:.2f}x of the original's {objective}; keeping the original is the better choice"]
    rng = winner.get("speedup_range")
    if objective == "latency" and rng and min(rng) <= 1 <= max(rng):
        lo, hi = 1 / max(rng), 1 / min(rng)
        return [f"{winner['name']}'s latency is within the run-to-run noise of the original's ({lo:.2f}-{hi:.2f}x per round): "
                "it does not measurably beat the original on latency; what it buys is in its report (size, memory, prefill)"]
    return []


def _quick_delta(ev: dict[str, Any]) -> dict[str, Any]:
    from .pipeline import _delta

    return _delta(ev, None, None)


def run_search(model: str, out: Path, max_drop: float, metric: str | None, objective: str, candidates: list[dict] | None,
               budget_minutes: float | None, device: str, seed: int, mixed: int, load_options: dict,
               say: Callable[[str], None] = lambda m: None, overwrite: bool = False,
               eval_spec: R.EvalSpec | None = None, bench_spec: R.BenchSpec | None = None,
               with_space: bool = False) -> dict[str, Any]:
    from . import pipeline
    from .evaluate import evaluate
    from .models import load

    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load(model, progress=say, **load_options)
    metric = metric or default_metric(base.kind)
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}")
    pool = list(candidates or []) + (default_space(base.kind) if with_space or not candidates else [])
    cands = [Candidate(c["name"], normalize_steps(c["steps"]), c.get("origin", "space")) for c in pool]
    names = [c.name for c in cands]
    if len(set(names)) != len(names):  # a shipped recipe named like a space entry: tell them apart
        for c in cands:
            if names.count(c.name) > 1 and c.origin == "space":
                c.name = f"space-{c.name}"
    eval_spec = eval_spec or R.EvalSpec()
    bench_spec = bench_spec or R.BenchSpec(device=device)
    quick = eval_spec.model_copy(update={"max_samples": 4 if base.kind != "encoder" else 24,
                                         "max_tokens": 2048 if base.kind == CAUSAL_LM else None})
    cache = out / ".cache"
    key_base = {"model": model_hash(Path(base.path)), "env": _environment_key(device), "eval": eval_spec.model_dump(),
                "bench": bench_spec.model_dump(), "seed": seed, "metric": metric}
    deadline = t0 + budget_minutes * 60 if budget_minutes else None

    def over_budget() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    # 1. pre-filter: a few batches; a candidate whose quick drop exceeds 3x the budget (and the
    #    budget + 2 points, since a few batches are noisy) is hopeless
    hopeless = max(3 * max_drop, max_drop + 0.02)
    from . import techniques

    def quick_cache(kind: str, what: Any) -> Path:  # pre-filter and sensitivity results, so a re-run skips them too
        return cache / kind / f"{_hash({**key_base, 'quick': quick.model_dump(), 'calib': PREFILTER_CALIB, kind: what})}.json"

    def prefilter(c: Candidate) -> None:
        hit = quick_cache("prefilter", c.steps)
        if hit.exists():  # the measurement is cached; the verdict follows this run's budget
            saved = json.loads(hit.read_text())
        else:
            saved = _measure_quick(c)
            hit.parent.mkdir(parents=True, exist_ok=True)
            hit.write_text(json.dumps(saved, default=str))
        c.prefilter = saved["prefilter"]
        d = c.prefilter.get("drop")
        if saved.get("error"):
            c.status, c.error = "failed", saved["error"]
        elif d is not None and d > hopeless:
            c.status = "dropped"
            c.error = f"pre-filter drop {d:.4f} is hopeless against the budget {max_drop:.4f} (cut-off {hopeless:.4f})"

    def _measure_quick(c: Candidate) -> dict[str, Any]:
        try:
            slim = copy.deepcopy(base.model)
            ctx = techniques.StepContext(kind=base.kind, seed=seed, tokenizer=base.tokenizer)
            slim = _apply_quick(slim, c.steps, ctx)
            ev = evaluate(slim, base.tokenizer, base.kind, quick, reference=base.model, seed=seed).to_dict()
            del slim
            qd = _quick_delta(ev)
            return {"prefilter": {"drop": drop({"delta": qd}, metric), "samples": quick.max_samples,
                                  **{k: qd[k] for k in ("kl_divergence", "top1_agreement", "mean_cosine") if qd.get(k) is not None}},
                    "error": None}
        except Exception as e:  # noqa: BLE001  a candidate that cannot apply to this model is a result, not a crash
            return {"prefilter": {}, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}

    seen: dict[str, Candidate] = {}
    for i, c in enumerate(cands):
        if over_budget():
            c.status, c.error = "skipped", "search budget (--budget-minutes) spent"
            continue
        twin = seen.setdefault(_hash(c.steps), c)
        if twin is not c:  # the same steps under another name (a shipped recipe and the space): measured once
            c.same_as = twin.name
            say(f"pre-filter {i + 1}/{len(cands)}: {c.name} (same steps as {twin.name})")
            continue
        say(f"pre-filter {i + 1}/{len(cands)}: {c.name}")
        prefilter(c)
    by_name = {c.name: c for c in cands}
    for c in cands:
        if c.same_as:
            twin = by_name[c.same_as]
            c.prefilter, c.status, c.error = twin.prefilter, twin.status, twin.error
    # 2. per-layer sensitivity of the candidate that missed the budget by the least (when keeping
    #    blocks in float can plausibly rescue it) → mixed-precision candidates, pre-filtered too
    sens = None
    lossy = [c for c in cands if not c.same_as and _mixable(c, max_drop)]
    if mixed and lossy and not over_budget():
        src = min(lossy, key=lambda c: c.prefilter["drop"])
        say(f"per-block sensitivity of {src.name} (pre-filter drop {src.prefilter['drop']:.2%})")
        hit = quick_cache("sensitivity", _sensitivity_steps(src.steps))
        if hit.exists():
            sens = json.loads(hit.read_text())
            say("sensitivity (cached)")
        else:
            sens = sensitivity(base, _sensitivity_steps(src.steps), metric, quick, seed, say)
            hit.parent.mkdir(parents=True, exist_ok=True)
            hit.write_text(json.dumps(sens))
        order = [s["block"] for s in sorted(sens, key=lambda s: -(s["drop"] or 0))]
        for k in mixed_counts(sens, src.prefilter["drop"], max_drop):
            steps = copy.deepcopy(src.steps)
            steps[-1]["ignore"] = list(steps[-1].get("ignore", [])) + [f"{b}.*" for b in order[:k]]
            mc = Candidate(f"{src.name}+float-top{k}", steps, "mixed")
            cands.append(mc)
            if not over_budget():
                say(f"pre-filter {mc.name}")
                prefilter(mc)
    # 3. full, isolated runs of the survivors (cached per model, recipe and environment)
    todo = [c for c in cands if c.status == "pending" and not c.same_as]
    ran, ran_s = 0, 0.0  # full runs done in this process and their time: the estimate ignores cached ones
    for i, c in enumerate(todo):
        if over_budget():
            c.status, c.error = "skipped", "search budget (--budget-minutes) spent"
            continue
        key = _hash({**key_base, "steps": c.steps})
        cached = cache / key / "report.json"
        eta = f", about {ran_s / ran * (len(todo) - i) / 60:.0f} min left" if ran else ""
        if cached.exists():
            c.report, c.status = json.loads(cached.read_text()), "done"
            say(f"candidate {i + 1}/{len(todo)}: {c.name} (cached)")
            continue
        started = time.perf_counter()
        say(f"candidate {i + 1}/{len(todo)}: {c.name}{eta}")
        dest = out / "candidates" / c.name
        try:
            try:
                rep = pipeline.run(_recipe(c, eval_spec, bench_spec, seed), model, dest, overwrite=True, load_options=load_options)
            except GateFailed as e:  # the report is written; a failed gate is judged at the verdict
                rep = e.report
            c.report, c.status = rep, "done"
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(rep, default=str))
            ran, ran_s = ran + 1, ran_s + time.perf_counter() - started
        except Exception as e:  # noqa: BLE001
            c.status, c.error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    # 4. verdict: ranked on the objective's ratio to the original measured in the same run
    for c in cands:
        if c.same_as:
            twin = by_name[c.same_as]
            c.report, c.status, c.error = twin.report, twin.status, twin.error
    read, lower = OBJECTIVES[objective]
    rows = []
    for c in cands:
        row = {"name": c.name, "origin": c.origin, "steps": c.steps, "status": c.status, "error": c.error,
               "prefilter_drop": c.prefilter.get("drop"), "prefilter": c.prefilter, "same_as": c.same_as}
        if c.report:
            d = c.report.get("delta") or {}
            row.update(drop=drop(c.report, metric), objective=read(c.report), vs_original=RATIOS[objective](d),
                       speedup=d.get("speedup"), speedup_range=d.get("speedup_range"), size_ratio=d.get("size_ratio"),
                       report=str(out / "candidates" / (c.same_as or c.name) / "report.json"))
            failed = gate_mod.failures(c.report.get("gates") or [])
            row["meets_budget"] = (row["drop"] is not None and row["drop"] <= max_drop and row["objective"] is not None
                                   and not failed)
            if failed:  # e.g. artifact_matches_memory: what was measured is not what was saved; it never wins
                row.update(status="gate failed", gates_failed=failed, error="gate failed: " + "; ".join(failed))
        rows.append(row)
    done = [r for r in rows if r.get("objective") is not None and r.get("drop") is not None and not r.get("gates_failed")]
    by_ratio = bool(done) and all(r.get("vs_original") is not None for r in done)
    key = (lambda r: r["vs_original"]) if by_ratio else (lambda r: r["objective"])  # a ratio keeps its objective's direction
    sign = 1 if lower else -1
    for r in done:
        r["pareto"] = not any(o is not r and o["drop"] <= r["drop"] and sign * key(o) <= sign * key(r)
                              and (o["drop"] < r["drop"] or sign * key(o) < sign * key(r)) for o in done)
    ok = [r for r in done if r["meets_budget"]]
    winner = min(ok, key=lambda r: sign * key(r)) if ok else None
    notes = winner_warnings(winner, objective, lower) if winner and by_ratio else []
    result = {"model": model, "metric": metric, "max_drop": max_drop, "objective": objective, "lower_is_better": lower,
              "candidates": rows, "sensitivity": sens, "seconds": round(time.perf_counter() - t0, 1), "winner": None,
              "ranked_by": f"{objective} as a ratio to the original, measured in the same run" if by_ratio else objective,
              "warnings": notes, "environment": _environment(device)}
    if winner:
        result["winner"] = winner["name"]
        src = out / "candidates" / (winner["same_as"] or winner["name"])
        for part in ("model", "report.json", "report.md"):
            dst = out / part
            if dst.is_dir():
                shutil.rmtree(dst)
            if (src / part).is_dir():
                shutil.copytree(src / part, dst)
            elif (src / part).exists():
                shutil.copy2(src / part, dst)
        result["winner_recipe"] = {"version": 1, "name": winner["name"], "steps": winner["steps"]}
        import yaml

        (out / "winner.yaml").write_text(yaml.safe_dump(result["winner_recipe"], sort_keys=False))
    else:
        closest = min(done, key=lambda r: r["drop"]) if done else None
        result["closest"] = None if closest is None else {"name": closest["name"], "drop": closest["drop"],
                                                          "missed_by": closest["drop"] - max_drop}
    (out / "search.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    reports = [c.report for c in cands if c.report]
    if reports:  # every finished candidate in one page, Pareto-optimal ones marked
        from .html import render

        (out / "search.html").write_text(render(reports, title=f"slimctl search · {model}", notes=[
            f"winner: {result['winner'] or 'none within the budget'} (ranked by {result['ranked_by']})", *notes]))
        result["html"] = str(out / "search.html")
    return result


def read_candidates(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p]
    for p in files:
        r = R.load(p)
        out.append({"name": r.name or Path(p).stem, "steps": [s.to_dict() for s in r.steps], "origin": "file"})
    if not out:
        raise DataError("no candidate recipes")
    return out
