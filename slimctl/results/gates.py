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
    "max_task_drop_pct": ("task_drop_pct", "max", "largest lm-eval task accuracy drop, % of baseline"),
}
# Settings of the gates, not gates: the fewest scored tokens a perplexity gate trusts.
SETTINGS = ("min_eval_tokens",)


def check(gates: dict[str, float | None], delta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configured gate; `passed` is None where the model's kind has no such number.

    A perplexity gate fails, with that reason, when the perplexity came from fewer scored tokens than
    `min_eval_tokens` (a ratio of two noisy figures is no evidence either way)."""
    rows = []
    floor = gates.get("min_eval_tokens") or 0
    for name, threshold in gates.items():
        if threshold is None or name in SETTINGS:
            continue
        field, sense, meaning = GATES[name]
        value = delta.get(field)
        if value is None:
            rows.append({"name": name, "threshold": threshold, "value": None, "passed": None,
                         "note": f"not applicable: this run has no {field}"})
            continue
        tokens = delta.get("tokens_scored")
        if name == "max_ppl_increase_pct" and tokens is not None and tokens < floor:
            rows.append({"name": name, "threshold": threshold, "value": value, "passed": False, "sense": sense,
                         "meaning": meaning, "reason": f"perplexity came from {tokens:,} scored tokens, fewer than "
                         f"min_eval_tokens {floor:,}: too few to gate on (score more text, or lower gates.min_eval_tokens)"})
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
        if r["passed"] is False and r.get("reason"):
            out.append(f"{r['name']}: {r['reason']}")
        elif r["passed"] is False:
            op = "<=" if r["sense"] == "max" else ">="
            out.append(f"{r['name']}: {r['value']:.4g} is not {op} {r['threshold']:g}")
    return out


# --- regression gates against a stored report ------------------------------------------------------

PRESETS = {"mlperf-99": 0.99, "mlperf-99.9": 0.999}  # MLPerf: at least 99 % / 99.9 % of reference accuracy


def quality(report: dict[str, Any]) -> tuple[str, float, bool] | None:
    """The slimmed model's headline accuracy metric: (name, value, higher_is_better)."""
    m = ((report.get("slimmed") or {}).get("eval") or {}).get("metrics") or {}
    for name, higher in (("accuracy", True), ("topic_accuracy", True), ("perplexity", False)):
        if m.get(name) is not None:
            return name, float(m[name]), higher
    return None


def _rounds(report: dict[str, Any]) -> list[float]:
    b = (report.get("slimmed") or {}).get("bench") or {}
    return list(b.get("rounds_p50_ms") or ([b["latency_ms"]["p50"]] if b.get("latency_ms") else []))


def against_baseline(new: dict[str, Any], old: dict[str, Any], min_quality: float | None = None,
                     max_latency_increase_pct: float | None = None, max_memory_increase_pct: float | None = None,
                     max_size_increase_pct: float | None = None) -> list[dict[str, Any]]:
    """Compare a run's slimmed model with the slimmed model of an earlier report.

    min_quality: the new accuracy as a fraction of the old (perplexity: old/new), e.g. 0.99.
    Latency is noise-aware: a slower p50 fails only when every new round is slower than every old
    round by more than the allowed increase; otherwise the change is inside the spread."""
    rows: list[dict[str, Any]] = []
    if min_quality is not None:
        qn, qo = quality(new), quality(old)
        if qn is None or qo is None or qn[0] != qo[0]:
            rows.append({"name": "baseline_quality", "threshold": min_quality, "value": None, "passed": None,
                         "note": "not applicable: the reports have no common accuracy metric"})
        else:
            name, vn, higher = qn
            frac = (vn / qo[1]) if higher else (qo[1] / vn)
            rows.append({"name": "baseline_quality", "threshold": min_quality, "value": frac, "passed": frac >= min_quality,
                         "sense": "min", "meaning": f"{name} now vs baseline report ({'new/old' if higher else 'old/new'}): "
                                                    f"{vn:.4g} vs {qo[1]:.4g}"})
    nb = (new.get("slimmed") or {}).get("bench") or {}
    ob = (old.get("slimmed") or {}).get("bench") or {}
    if max_latency_increase_pct is not None:
        rn, ro = _rounds(new), _rounds(old)
        if not rn or not ro:
            rows.append({"name": "baseline_latency", "threshold": max_latency_increase_pct, "value": None, "passed": None,
                         "note": "not applicable: a report has no bench"})
        else:
            pn, po = nb["latency_ms"]["p50"], ob["latency_ms"]["p50"]
            inc = (pn / po - 1) * 100
            limit = 1 + max_latency_increase_pct / 100
            row = {"name": "baseline_latency", "threshold": max_latency_increase_pct, "value": inc, "sense": "max",
                   "meaning": f"p50 latency change vs baseline report, % ({pn:.4g} vs {po:.4g} ms)", "passed": inc <= max_latency_increase_pct}
            if not row["passed"] and min(rn) <= max(ro) * limit:
                row.update(passed=True, within_noise=True, note=f"rounds {min(rn):.4g}-{max(rn):.4g} ms overlap the baseline's "
                                                                 f"{min(ro):.4g}-{max(ro):.4g} ms (+{max_latency_increase_pct:g}%): within noise")
            rows.append(row)
    for key, limit, field in (("baseline_memory", max_memory_increase_pct, "peak_memory_mb"),
                              ("baseline_size", max_size_increase_pct, "size_mb")):
        if limit is None:
            continue
        vn, vo = nb.get(field), ob.get(field)
        if not vn or not vo:
            rows.append({"name": key, "threshold": limit, "value": None, "passed": None, "note": f"not applicable: no {field}"})
            continue
        inc = (vn / vo - 1) * 100
        rows.append({"name": key, "threshold": limit, "value": inc, "passed": inc <= limit, "sense": "max",
                     "meaning": f"{field} change vs baseline report, % ({vn:.4g} vs {vo:.4g})"})
    return rows


def junit(rows: list[dict[str, Any]], suite: str = "slimctl gates") -> str:
    """The gates as JUnit XML: one test case per gate; failed → <failure>, not applicable → <skipped>."""
    from xml.sax.saxutils import escape, quoteattr

    fails = sum(r["passed"] is False for r in rows)
    skips = sum(r["passed"] is None for r in rows)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites><testsuite name={quoteattr(suite)} tests="{len(rows)}" failures="{fails}" skipped="{skips}">']
    for r in rows:
        desc = f"value {r['value']:.6g}, threshold {r['threshold']:g}" if r.get("value") is not None else r.get("note", "")
        out.append(f'  <testcase classname="slimctl.gates" name={quoteattr(r["name"])}>')
        if r["passed"] is False:
            out.append(f"    <failure message={quoteattr(failures([r])[0])}>{escape(r.get('meaning', ''))}; {escape(desc)}</failure>")
        elif r["passed"] is None:
            out.append(f"    <skipped message={quoteattr(r.get('note', 'not applicable'))}/>")
        else:
            out.append(f"    <system-out>{escape(desc + ('; ' + r['note'] if r.get('note') else ''))}</system-out>")
        out.append("  </testcase>")
    out.append("</testsuite></testsuites>")
    return "\n".join(out) + "\n"
