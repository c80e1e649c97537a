"""The run report as Markdown: short enough for a PR comment or a CI step summary (verdict first,
one table, then the gates)."""
from __future__ import annotations

from typing import Any


def fmt(v: Any, nd: int = 4) -> str:
    """The one number format of Markdown and HTML output."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _metric_rows(r: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    b, s = r.get("baseline") or {}, r.get("slimmed") or {}
    be, se = b.get("eval") or {}, s.get("eval") or {}
    rows: list[tuple[str, Any, Any]] = []
    for k in sorted(set((be.get("metrics") or {})) | set((se.get("metrics") or {}))):
        rows.append((k, (be.get("metrics") or {}).get(k), (se.get("metrics") or {}).get(k)))
    for k, v in (se.get("vs_reference") or {}).items():
        rows.append((f"{k} (vs baseline)", None, v))
    bb, sb = b.get("bench") or {}, s.get("bench") or {}
    if bb or sb:
        rows += _bench_rows(bb, sb)
    return rows


def _bench_rows(bb: dict[str, Any], sb: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    lat_of = sb.get("latency_of") or bb.get("latency_of") or "latency"
    rows = [(f"{lat_of} latency {q} (ms)", (bb.get("latency_ms") or {}).get(q), (sb.get("latency_ms") or {}).get(q))
            for q in ("p50", "p90", "p99")]
    if "prefill_ms" in bb or "prefill_ms" in sb:
        rows.append(("prefill p50 (ms)", (bb.get("prefill_ms") or {}).get("p50"), (sb.get("prefill_ms") or {}).get("p50")))
    if "decode_tokens_per_s" in bb or "decode_tokens_per_s" in sb:
        rows.append(("decode tokens/s", bb.get("decode_tokens_per_s"), sb.get("decode_tokens_per_s")))
    rows.append(("throughput samples/s", (bb.get("throughput") or {}).get("samples_per_s"),
                 (sb.get("throughput") or {}).get("samples_per_s")))
    rows.append(("peak memory (MB)", bb.get("peak_memory_mb"), sb.get("peak_memory_mb")))
    rows.append(("size on disk (MB)", bb.get("size_mb"), sb.get("size_mb")))
    return rows


def report(r: dict[str, Any]) -> str:
    """The run report: verdict, headline deltas, one metric table, gates, warnings, machine."""
    verdict = {True: "PASSED", False: "FAILED", None: "NO GATES"}[r.get("passed")]
    recipe = r.get("recipe") or {}
    steps = ", ".join(s.get("method", "?") for s in recipe.get("steps", []))
    lines = [f"# slimctl: {verdict} — {r.get('model', {}).get('source', '?')} · {recipe.get('name') or steps}", ""]
    d = r.get("delta") or {}
    bits = [f"{k} {fmt(d[k])}" for k in ("speedup", "decode_speedup", "perplexity_ratio", "fidelity", "size_ratio") if d.get(k) is not None]
    if bits:
        lines += ["**" + " · ".join(bits) + "**", ""]
    lines += ["| metric | baseline | slimmed |", "|---|---:|---:|"]
    lines += [f"| {k} | {fmt(b)} | {fmt(s)} |" for k, b, s in _metric_rows(r)]
    gates = r.get("gates") or []
    if gates:
        lines += ["", "| gate | threshold | value | result |", "|---|---:|---:|---|"]
        for g in gates:
            res = {True: "pass", False: "**FAIL**", None: "n/a"}[g["passed"]]
            lines.append(f"| {g['name']} | {fmt(g['threshold'])} | {fmt(g['value'])} | {res} |")
    for w in r.get("warnings") or []:
        lines.append(f"\n> warning: {w}")
    env = r.get("environment") or {}
    art = r.get("artifact") or {}
    lines += ["", f"Steps: {steps}. Artifact: `{art.get('path', '–')}` ({art.get('loads_with', '?')}). "
              f"Machine: {env.get('cpu', '?')}, {env.get('threads', '?')} threads, seed {env.get('seed')}, "
              f"torch {env.get('versions', {}).get('torch', '?')}."]
    cost = _cost(r)
    if cost:
        lines += ["", "Where the slimming time went: " + "; ".join(cost) + "."]
    return "\n".join(lines) + "\n"


def _cost(r: dict[str, Any]) -> list[str]:
    """Per calibrated step: its seconds and its three largest stages (share, and % of the matmul peak)."""
    out = []
    for s in (r.get("slimmed") or {}).get("steps") or []:
        rows = sorted((x for x in s.get("time_breakdown") or [] if x.get("share")), key=lambda x: -x["seconds"])[:3]
        if not rows or s.get("seconds") is None:
            continue
        parts = [f"{x['stage']} {x['share']:.0%}" + (f" (at {x['pct_of_matmul_peak']:.0f}% of the matmul peak)"
                                                     if x.get("pct_of_matmul_peak") is not None else "") for x in rows]
        out.append(f"{s.get('method', '?')} {s['seconds']:.0f} s: " + ", ".join(parts))
    return out
