"""Gates: thresholds a slimmed model must meet, checked against the report's measured deltas."""
from __future__ import annotations

from typing import Any

# gate name -> (delta field it reads, "max" or "min", what it means)
# A field with a "<field>_range" in the delta (per-round values) is judged noise-aware: a threshold
# inside that range is not a failure, since the rounds themselves disagree about which side it is on.
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
        row = {"name": name, "threshold": threshold, "value": value, "passed": ok, "sense": sense, "meaning": meaning}
        rng = delta.get(f"{field}_range")
        if not ok and rng and rng[0] <= threshold <= rng[1]:
            row.update(passed=True, within_noise=True, range=rng,
                       note=f"{value:.3g} misses {threshold:g}, but the rounds ranged {rng[0]:.3g}-{rng[1]:.3g}: within noise")
        rows.append(row)
    return rows


def failures(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["passed"] is False:
            op = "<=" if r["sense"] == "max" else ">="
            out.append(f"{r['name']}: {r['value']:.4g} is not {op} {r['threshold']:g}")
    return out
