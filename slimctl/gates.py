"""Gates: thresholds a slimmed model must meet, checked against the report's measured deltas."""
from __future__ import annotations

from typing import Any

# gate name -> (delta field it reads, "max" or "min", what it means)
GATES = {
    "max_ppl_increase_pct": ("perplexity_increase_pct", "max", "perplexity increase, % of baseline"),
    "min_fidelity": ("fidelity", "min", "fidelity vs baseline (encoder: mean cosine; else top-1 agreement)"),
    "min_speedup": ("speedup", "min", "baseline p50 latency / slimmed p50 latency"),
    "max_size_ratio": ("size_ratio", "max", "slimmed size on disk / baseline size on disk"),
}


def check(gates: dict[str, float | None], delta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configured gate; `passed` is None where the model's kind has no such number."""
    rows = []
    for name, threshold in gates.items():
        if threshold is None:
            continue
        field, sense, meaning = GATES[name]
        value = delta.get(field)
        if value is None:
            rows.append({"name": name, "threshold": threshold, "value": None, "passed": None,
                         "note": f"not applicable: this run has no {field}"})
            continue
        ok = value <= threshold if sense == "max" else value >= threshold
        rows.append({"name": name, "threshold": threshold, "value": value, "passed": ok, "sense": sense, "meaning": meaning})
    return rows


def failures(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["passed"] is False:
            op = "<=" if r.get("sense", "min" if r["name"].startswith("min") else "max") == "max" else ">="
            out.append(f"{r['name']}: {r['value']:.4g} is not {op} {r['threshold']:g}")
    return out
