"""The run report as Markdown: short enough for a PR comment or a CI step summary (verdict first,
one table, then the gates)."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..results.report import SCHEMA, BenchResult, Report, Side, as_report, first_error


def fmt(v: Any, nd: int = 4) -> str:
    """The one number format of Markdown and HTML output."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _metric_rows(b: Side, s: Side) -> list[tuple[str, Any, Any]]:
    bm = (b.eval.metrics if b.eval else None) or {}
    sm = (s.eval.metrics if s.eval else None) or {}
    rows: list[tuple[str, Any, Any]] = [(k, bm.get(k), sm.get(k)) for k in sorted(set(bm) | set(sm))]
    rows += [(f"{k} (vs baseline)", None, v) for k, v in ((s.eval.vs_reference if s.eval else None) or {}).items()]
    if b.bench or s.bench:
        rows += _bench_rows(b.bench, s.bench)
    return rows


def _bench_rows(bb: BenchResult | None, sb: BenchResult | None) -> list[tuple[str, Any, Any]]:
    def both(read) -> tuple[Any, Any]:
        return tuple(read(x) if x else None for x in (bb, sb))

    lat_of = (sb and sb.latency_of) or (bb and bb.latency_of) or "latency"
    rows = [(f"{lat_of} latency {q} (ms)", *both(lambda x: getattr(x.latency_ms, q))) for q in ("p50", "p90", "p99")]
    if any(x and x.prefill_ms for x in (bb, sb)):
        rows.append(("prefill p50 (ms)", *both(lambda x: x.prefill_ms.p50 if x.prefill_ms else None)))
    if any(x and x.decode_tokens_per_s is not None for x in (bb, sb)):
        rows.append(("decode tokens/s", *both(lambda x: x.decode_tokens_per_s)))
    rows.append(("throughput samples/s", *both(lambda x: x.throughput.samples_per_s)))
    rows.append(("peak memory (MB)", *both(lambda x: x.peak_memory_mb)))
    rows.append(("size on disk (MB)", *both(lambda x: x.size_mb)))
    return rows


def report(data: Report | dict[str, Any]) -> str:
    """The run report: verdict, headline deltas, one metric table, gates, warnings, machine."""
    try:
        r = as_report(data)
    except ValidationError as e:  # a slimctl bug (the run says so in its warnings); report.json still holds it all
        return f"# slimctl: this report does not match the {SCHEMA} schema ({first_error(e)}); see report.json\n"
    verdict = {True: "PASSED", False: "FAILED", None: "NO GATES"}[r.passed]
    steps = ", ".join(s.get("method", "?") for s in r.recipe.get("steps", []))
    lines = [f"# slimctl: {verdict} — {r.model.source} · {r.recipe.get('name') or steps}", ""]
    bits = [f"{k} {fmt(getattr(r.delta, k))}" for k in ("speedup", "decode_speedup", "perplexity_ratio", "fidelity", "size_ratio")
            if getattr(r.delta, k) is not None]
    if bits:
        lines += ["**" + " · ".join(bits) + "**", ""]
    lines += ["| metric | baseline | slimmed |", "|---|---:|---:|"]
    lines += [f"| {k} | {fmt(b)} | {fmt(s)} |" for k, b, s in _metric_rows(r.baseline, r.slimmed)]
    if r.gates:
        lines += ["", "| gate | threshold | value | result |", "|---|---:|---:|---|"]
        for g in r.gates:
            res = {True: "pass", False: "**FAIL**", None: "n/a"}[g.passed]
            lines.append(f"| {g.name} | {fmt(g.threshold)} | {fmt(g.value)} | {res} |")
    lines += [f"\n> warning: {w}" for w in r.warnings]
    env, art = r.environment, r.artifact
    lines += ["", f"Steps: {steps}. Artifact: `{art.path if art else '–'}` ({art.loads_with if art else '?'}). "
              f"Machine: {env.cpu or '?'}, {env.threads or '?'} threads, seed {env.seed}, "
              f"torch {env.versions.get('torch', '?')}."]
    cost = _cost(r)
    if cost:
        lines += ["", "Where the slimming time went: " + "; ".join(cost) + "."]
    return "\n".join(lines) + "\n"


def _cost(r: Report) -> list[str]:
    """Per calibrated step: its seconds and its three largest stages (share, and % of the matmul peak)."""
    out = []
    for s in r.slimmed.steps:
        rows = sorted((x for x in s.time_breakdown or [] if x.share), key=lambda x: -x.seconds)[:3]
        if not rows or s.seconds is None:
            continue
        parts = [f"{x.stage} {x.share:.0%}" + (f" (at {x.pct_of_matmul_peak:.0f}% of the matmul peak)"
                                               if x.pct_of_matmul_peak is not None else "") for x in rows]
        out.append(f"{s.method} {s.seconds:.0f} s: " + ", ".join(parts))
    return out
