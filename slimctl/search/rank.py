"""The verdict of a search, as pure functions of measured reports: each candidate's drop and objective,
the Pareto set, the winner within the budget, the closest miss, and what a user must be warned of.
Nothing here runs a model, so every rule is unit-tested on hand-written rows."""
from __future__ import annotations

from typing import Any

from ..results import gates as gate_mod
from ..kinds import CAUSAL_LM, ENCODER
from ..results.report import pareto_front

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


def row(c, metric: str, objective: str, max_drop: float, report_path: str | None) -> dict[str, Any]:
    """One candidate's line of the result: its measurements, whether it meets the budget, and why not."""
    out = {"name": c.name, "origin": c.origin, "steps": c.steps, "status": c.status, "error": c.error,
           "prefilter_drop": c.prefilter.get("drop"), "prefilter": c.prefilter, "same_as": c.same_as, "node": c.node}
    if not c.report:
        return out
    d = c.report.get("delta") or {}
    out.update(drop=drop(c.report, metric), objective=OBJECTIVES[objective][0](c.report), vs_original=RATIOS[objective](d),
               speedup=d.get("speedup"), speedup_range=d.get("speedup_range"), size_ratio=d.get("size_ratio"),
               report=report_path)
    failed = gate_mod.failures(c.report.get("gates") or [])
    out["meets_budget"] = out["drop"] is not None and out["drop"] <= max_drop and out["objective"] is not None and not failed
    if failed:  # e.g. artifact_matches_memory: what was measured is not what was saved; it never wins
        out.update(status="gate failed", gates_failed=failed, error="gate failed: " + "; ".join(failed))
    return out


def verdict(rows: list[dict[str, Any]], objective: str, max_drop: float) -> dict[str, Any]:
    """Marks the Pareto set (drop against the objective) on `rows` and returns the winner (the best on
    the objective within the budget, gates passed), how candidates were ranked, warnings, and the
    closest miss when nothing is within the budget."""
    lower = OBJECTIVES[objective][1]
    done = [r for r in rows if r.get("objective") is not None and r.get("drop") is not None and not r.get("gates_failed")]
    by_ratio = bool(done) and all(r.get("vs_original") is not None for r in done)
    sign = 1 if lower else -1
    key = (lambda r: sign * r["vs_original"]) if by_ratio else (lambda r: sign * r["objective"])
    for r, on_front in zip(done, pareto_front([(r["drop"], key(r)) for r in done])):
        r["pareto"] = on_front
    ok = [r for r in done if r["meets_budget"]]
    fastest = min(ok, key=key) if ok else None
    ties = tied(ok, fastest, objective) if fastest else []
    winner = min(ties, key=lambda r: (r["drop"], key(r))) if ties else None
    closest = min(done, key=lambda r: r["drop"]) if done and not winner else None
    warnings = winner_warnings(winner, objective, lower) if winner and by_ratio else []
    if len(ties) > 1:
        warnings.append(f"{', '.join(r['name'] for r in ties if r is not winner)} and {winner['name']} are equally fast "
                        "within the per-round noise (their per-round latency ranges overlap the fastest one's); the most "
                        f"accurate of them, {winner['name']}, wins")
    return {"winner": winner, "tied": [r["name"] for r in ties] if len(ties) > 1 else [],
            "ranked_by": (f"{objective} as a ratio to the original, measured in the same run" if by_ratio else objective)
            + ("; candidates as fast as the fastest within the per-round noise by drop" if len(ties) > 1 else ""),
            "warnings": warnings,
            "closest": None if closest is None else {"name": closest["name"], "drop": closest["drop"],
                                                     "missed_by": closest["drop"] - max_drop}}


def tied(ok: list[dict[str, Any]], fastest: dict[str, Any], objective: str) -> list[dict[str, Any]]:
    """The candidates within the budget as fast as the fastest within the noise: latency ratios whose
    per-round ranges (alternating rounds beside the original) overlap the fastest one's. Which of them
    is fastest changes from run to run; the verdict must not."""
    rng = fastest.get("speedup_range")
    if objective != "latency" or not rng:
        return [fastest]
    lo, hi = min(rng), max(rng)
    return [r for r in ok if r is fastest or (r.get("speedup_range") and max(r["speedup_range"]) >= lo
                                               and min(r["speedup_range"]) <= hi)]


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
