"""The verdict of a search, as pure functions of measured reports: each candidate's drop and objective,
the Pareto set, the winner within the budget, the closest miss, and what a user must be warned of.
Nothing here runs a model, so every rule is unit-tested on hand-written rows."""
from __future__ import annotations


from ..results import gates as gate_mod
from ..kinds import CAUSAL_LM, ENCODER
from ..results.report import Delta, Report, as_report, pareto_front
from ..results.search import CandidateRow, Closest, Verdict

def _bench(r: Report, read):
    return read(r.slimmed.bench) if r.slimmed.bench else None


OBJECTIVES = {  # name -> (how to read it from a report, lower is better)
    "latency": (lambda r: _bench(r, lambda b: b.latency_ms.p50), True),
    "throughput": (lambda r: _bench(r, lambda b: b.throughput.samples_per_s), False),
    "size": (lambda r: _bench(r, lambda b: b.size_mb), True),
    "memory": (lambda r: _bench(r, lambda b: b.peak_memory_mb), True),
    "cost": (lambda r: _bench(r, lambda b: 1.0 / b.throughput.samples_per_s if b.throughput.samples_per_s else None), True),
}
# The same objective as a ratio to the original model measured in the same run (alternating rounds):
# candidates run minutes apart on a machine whose speed drifts, so they are ranked on this ratio.
RATIOS = {  # name -> (ratio from a report's delta, lower is better)
    "latency": lambda d: 1 / d.speedup if d.speedup else None,
    "throughput": lambda d: d.throughput_ratio,
    "size": lambda d: d.size_ratio,
    "memory": lambda d: d.peak_memory_ratio,
    "cost": lambda d: 1 / d.throughput_ratio if d.throughput_ratio else None,
}
METRICS = ("ppl", "accuracy", "fidelity")


def default_metric(kind: str) -> str:
    return {CAUSAL_LM: "ppl", ENCODER: "fidelity"}.get(kind, "accuracy")


def drop(d: Delta, metric: str) -> float | None:
    """How much the slimmed model lost on `metric` (a run's delta), as a fraction (0.01 = 1 %)."""
    if metric == "ppl":
        return None if d.perplexity_ratio is None else d.perplexity_ratio - 1
    if metric == "fidelity":
        return None if d.fidelity is None else 1 - d.fidelity
    change = next((v for v in (d.accuracy_change, d.topic_accuracy_change) if v is not None), None)
    return None if change is None else -change


def row(c, metric: str, objective: str, max_drop: float, report_path: str | None) -> CandidateRow:
    """One candidate's line of the result: its measurements, whether it meets the budget, and why not."""
    out = CandidateRow(name=c.name, origin=c.origin, steps=c.steps, status=c.status, error=c.error,
                       prefilter_drop=c.prefilter.get("drop"), prefilter=c.prefilter, same_as=c.same_as, node=c.node)
    if not c.report:
        return out
    rep = as_report(c.report)
    d = rep.delta
    out.drop, out.objective, out.vs_original = drop(d, metric), OBJECTIVES[objective][0](rep), RATIOS[objective](d)
    out.speedup, out.speedup_range, out.size_ratio, out.report = d.speedup, d.speedup_range, d.size_ratio, report_path
    failed = gate_mod.failures(rep.gates)
    out.meets_budget = out.drop is not None and out.drop <= max_drop and out.objective is not None and not failed
    if failed:  # e.g. artifact_matches_memory: what was measured is not what was saved; it never wins
        out.status, out.gates_failed, out.error = "gate failed", failed, "gate failed: " + "; ".join(failed)
    return out


def verdict(rows: list[CandidateRow], objective: str, max_drop: float) -> Verdict:
    """Marks the Pareto set (drop against the objective) on `rows` and returns the winner (the best on
    the objective within the budget, gates passed), how candidates were ranked, warnings, and the
    closest miss when nothing is within the budget."""
    lower = OBJECTIVES[objective][1]
    done = [r for r in rows if r.objective is not None and r.drop is not None and not r.gates_failed]
    by_ratio = bool(done) and all(r.vs_original is not None for r in done)
    sign = 1 if lower else -1
    key = (lambda r: sign * r.vs_original) if by_ratio else (lambda r: sign * r.objective)
    for r, on_front in zip(done, pareto_front([(r.drop, key(r)) for r in done])):
        r.pareto = on_front
    ok = [r for r in done if r.meets_budget]
    fastest = min(ok, key=key) if ok else None
    ties = tied(ok, fastest, objective) if fastest else []
    winner = min(ties, key=lambda r: (r.drop, key(r))) if ties else None
    closest = min(done, key=lambda r: r.drop) if done and not winner else None
    warnings = winner_warnings(winner, objective, lower) if winner and by_ratio else []
    if len(ties) > 1:
        warnings.append(f"{', '.join(r.name for r in ties if r is not winner)} and {winner.name} are equally fast "
                        "within the per-round noise (their per-round latency ranges overlap the fastest one's); the most "
                        f"accurate of them, {winner.name}, wins")
    return Verdict(winner=winner, tied=[r.name for r in ties] if len(ties) > 1 else [],
                   ranked_by=(f"{objective} as a ratio to the original, measured in the same run" if by_ratio else objective)
                   + ("; candidates as fast as the fastest within the per-round noise by drop" if len(ties) > 1 else ""),
                   warnings=warnings,
                   closest=None if closest is None else Closest(name=closest.name, drop=closest.drop,
                                                                missed_by=closest.drop - max_drop))


def tied(ok: list[CandidateRow], fastest: CandidateRow, objective: str) -> list[CandidateRow]:
    """The candidates within the budget as fast as the fastest within the noise: latency ratios whose
    per-round ranges (alternating rounds beside the original) overlap the fastest one's. Which of them
    is fastest changes from run to run; the verdict must not."""
    rng = fastest.speedup_range
    if objective != "latency" or not rng:
        return [fastest]
    lo, hi = min(rng), max(rng)
    return [r for r in ok if r is fastest or (r.speedup_range and max(r.speedup_range) >= lo and min(r.speedup_range) <= hi)]


def winner_warnings(winner: CandidateRow, objective: str, lower: bool) -> list[str]:
    """What a user must hear about a winner ranked on its ratio to the original: that it is worse
    than the original on the objective, or (latency) that its gain lies within the per-round noise."""
    vs = winner.vs_original
    if (vs > 1.0) if lower else (vs < 1.0):
        return [f"no candidate within the budget beats the original model on {objective}: the best, {winner.name}, "
                f"is at {vs:.2f}x of the original's {objective}; keeping the original is the better choice"]
    rng = winner.speedup_range
    if objective == "latency" and rng and min(rng) <= 1 <= max(rng):
        lo, hi = 1 / max(rng), 1 / min(rng)
        return [f"{winner.name}'s latency is within the run-to-run noise of the original's ({lo:.2f}-{hi:.2f}x per round): "
                "it does not measurably beat the original on latency; what it buys is in its report (size, memory, prefill)"]
    return []
