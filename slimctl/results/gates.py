"""Gates: thresholds a slimmed model must meet, checked against the report's measured deltas."""
from __future__ import annotations

from .report import BenchResult, Delta, GateRow, Report, as_report

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


def check(gates: dict[str, float | None], delta: Delta) -> list[GateRow]:
    """One row per configured gate; `passed` is None where the model's kind has no such number.

    A perplexity gate fails, with that reason, when the perplexity came from fewer scored tokens than
    `min_eval_tokens` (a ratio of two noisy figures is no evidence either way)."""
    rows = []
    floor = gates.get("min_eval_tokens") or 0
    for name, threshold in gates.items():
        if threshold is None or name in SETTINGS:
            continue
        field, sense, meaning = GATES[name]
        value = getattr(delta, field)
        if value is None:
            rows.append(GateRow(name=name, threshold=threshold, value=None, passed=None,
                                note=f"not applicable: this run has no {field}"))
            continue
        tokens = delta.tokens_scored
        if name == "max_ppl_increase_pct" and tokens is not None and tokens < floor:
            rows.append(GateRow(name=name, threshold=threshold, value=value, passed=False, sense=sense, meaning=meaning,
                                reason=f"perplexity came from {tokens:,} scored tokens, fewer than min_eval_tokens "
                                f"{floor:,}: too few to gate on (score more text, or lower gates.min_eval_tokens)"))
            continue
        ok = value <= threshold if sense == "max" else value >= threshold
        row = GateRow(name=name, threshold=threshold, value=value, passed=ok, sense=sense, meaning=meaning)
        rng = getattr(delta, f"{field}_range", None)
        if not ok and rng and rng[0] <= threshold <= rng[1]:
            row.passed, row.within_noise, row.range = True, True, rng
            row.note = f"{value:.3g} misses {threshold:g}, but the rounds ranged {rng[0]:.3g}-{rng[1]:.3g}: within noise"
        rows.append(row)
    return rows


def failures(rows: list[GateRow]) -> list[str]:
    out = []
    for r in rows:
        if r.passed is False and r.reason:
            out.append(f"{r.name}: {r.reason}")
        elif r.passed is False:
            op = "<=" if r.sense == "max" else ">="
            out.append(f"{r.name}: {r.value:.4g} is not {op} {r.threshold:g}")
    return out


# --- regression gates against a stored report ------------------------------------------------------

PRESETS = {"mlperf-99": 0.99, "mlperf-99.9": 0.999}  # MLPerf: at least 99 % / 99.9 % of reference accuracy


def quality_of(metrics: dict[str, float | None] | None) -> tuple[str, float, bool] | None:
    """The headline accuracy metric of an eval's metrics: (name, value, higher_is_better)."""
    for name, higher in (("accuracy", True), ("topic_accuracy", True), ("perplexity", False)):
        if (metrics or {}).get(name) is not None:
            return name, float(metrics[name]), higher
    return None


def quality(report: Report) -> tuple[str, float, bool] | None:
    """The slimmed model's headline accuracy metric: (name, value, higher_is_better)."""
    ev = report.slimmed.eval
    return quality_of(ev.metrics if ev else None)


def _rounds(b: BenchResult | None) -> list[float]:
    return list((b.rounds_p50_ms or [b.latency_ms.p50]) if b else [])


def _quality_row(new: Report, old: Report, min_quality: float) -> GateRow:
    qn, qo = quality(new), quality(old)
    if qn is None or qo is None or qn[0] != qo[0]:
        return GateRow(name="baseline_quality", threshold=min_quality, value=None, passed=None,
                       note="not applicable: the reports have no common accuracy metric")
    name, vn, higher = qn
    frac = (vn / qo[1]) if higher else (qo[1] / vn)
    return GateRow(name="baseline_quality", threshold=min_quality, value=frac, passed=frac >= min_quality, sense="min",
                   meaning=f"{name} now vs baseline report ({'new/old' if higher else 'old/new'}): {vn:.4g} vs {qo[1]:.4g}")


def _latency_row(nb: BenchResult | None, ob: BenchResult | None, limit_pct: float) -> GateRow:
    """Noise-aware: a slower p50 fails only when every new round is slower than every old round by more
    than the allowed increase; otherwise the change is inside the spread."""
    rn, ro = _rounds(nb), _rounds(ob)
    if not rn or not ro:
        return GateRow(name="baseline_latency", threshold=limit_pct, value=None, passed=None,
                       note="not applicable: a report has no bench")
    pn, po = nb.latency_ms.p50, ob.latency_ms.p50
    inc = (pn / po - 1) * 100
    row = GateRow(name="baseline_latency", threshold=limit_pct, value=inc, sense="max", passed=inc <= limit_pct,
                  meaning=f"p50 latency change vs baseline report, % ({pn:.4g} vs {po:.4g} ms)")
    if not row.passed and min(rn) <= max(ro) * (1 + limit_pct / 100):
        row.passed, row.within_noise = True, True
        row.note = (f"rounds {min(rn):.4g}-{max(rn):.4g} ms overlap the baseline's {min(ro):.4g}-{max(ro):.4g} ms "
                    f"(+{limit_pct:g}%): within noise")
    return row


def against_baseline(new: Report | dict, old: Report | dict, min_quality: float | None = None,
                     max_latency_increase_pct: float | None = None, max_memory_increase_pct: float | None = None,
                     max_size_increase_pct: float | None = None) -> list[GateRow]:
    """Compare a run's slimmed model with the slimmed model of an earlier report.

    min_quality: the new accuracy as a fraction of the old (perplexity: old/new), e.g. 0.99."""
    new, old = as_report(new), as_report(old)
    rows: list[GateRow] = []
    if min_quality is not None:
        rows.append(_quality_row(new, old, min_quality))
    nb, ob = new.slimmed.bench, old.slimmed.bench
    if max_latency_increase_pct is not None:
        rows.append(_latency_row(nb, ob, max_latency_increase_pct))
    for key, limit, field in (("baseline_memory", max_memory_increase_pct, "peak_memory_mb"),
                              ("baseline_size", max_size_increase_pct, "size_mb")):
        if limit is None:
            continue
        vn, vo = getattr(nb, field, None), getattr(ob, field, None)
        if not vn or not vo:
            rows.append(GateRow(name=key, threshold=limit, value=None, passed=None, note=f"not applicable: no {field}"))
            continue
        inc = (vn / vo - 1) * 100
        rows.append(GateRow(name=key, threshold=limit, value=inc, passed=inc <= limit, sense="max",
                            meaning=f"{field} change vs baseline report, % ({vn:.4g} vs {vo:.4g})"))
    return rows


def junit(rows: list[GateRow], suite: str = "slimctl gates") -> str:
    """The gates as JUnit XML: one test case per gate; failed → <failure>, not applicable → <skipped>."""
    from xml.sax.saxutils import escape, quoteattr

    fails = sum(r.passed is False for r in rows)
    skips = sum(r.passed is None for r in rows)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites><testsuite name={quoteattr(suite)} tests="{len(rows)}" failures="{fails}" skipped="{skips}">']
    for r in rows:
        desc = f"value {r.value:.6g}, threshold {r.threshold:g}" if r.value is not None else (r.note or "")
        out.append(f'  <testcase classname="slimctl.gates" name={quoteattr(r.name)}>')
        if r.passed is False:
            out.append(f"    <failure message={quoteattr(failures([r])[0])}>{escape(r.meaning or '')}; {escape(desc)}</failure>")
        elif r.passed is None:
            out.append(f"    <skipped message={quoteattr(r.note or 'not applicable')}/>")
        else:
            out.append(f"    <system-out>{escape(desc + ('; ' + r.note if r.note else ''))}</system-out>")
        out.append("  </testcase>")
    out.append("</testsuite></testsuites>")
    return "\n".join(out) + "\n"
