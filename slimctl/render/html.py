"""One self-contained HTML page for one or more reports: no scripts, no network, plots as inline SVG
(accuracy against latency, size and peak-memory bars, latency distributions, gates, environment)."""
from __future__ import annotations

import html
import math
from typing import Any

from ..results.gates import quality
from ..results.report import pareto_front
from .markdown import fmt as _n  # one number format for Markdown and HTML

BASE_C, SLIM_C, PASS_C, FAIL_C, NA_C = "#6b7280", "#2563eb", "#15803d", "#b91c1c", "#9ca3af"


def _e(x: Any) -> str:
    return html.escape(str(x))


def label(r: dict[str, Any]) -> str:
    rec = r.get("recipe") or {}
    return rec.get("name") or "+".join(s.get("method", "?") for s in rec.get("steps", [])) or "run"


def point(r: dict[str, Any], side: str = "slimmed") -> dict[str, Any]:
    """The numbers of one side of a report that the plots and tables use."""
    s = r.get(side) or {}
    b = s.get("bench") or {}
    m = (s.get("eval") or {}).get("metrics") or {}
    q = quality({"slimmed": {"eval": {"metrics": m}}})
    return {"latency": (b.get("latency_ms") or {}).get("p50"), "size": b.get("size_mb"), "memory": b.get("peak_memory_mb"),
            "metric": q[0] if q else None, "value": q[1] if q else None, "higher": q[2] if q else True,
            "samples": ((b.get("phases") or {}).get(b.get("latency_of") or "", {}).get("latency_ms") or {}).get("values") or []}


def pareto(points: list[dict[str, Any]]) -> list[bool]:
    """True for points no other point beats on both latency (lower) and the metric (better)."""
    return pareto_front([None if p["latency"] is None or p["value"] is None
                         else (p["latency"], -p["value"] if p["higher"] else p["value"]) for p in points])


def _scatter(pts: list[tuple[str, dict, str]], metric: str, higher: bool, w: int = 560, h: int = 320) -> str:
    pts = [(n, p, c) for n, p, c in pts if p["latency"] is not None and p["value"] is not None]
    if not pts:
        return "<p>No accuracy and latency to plot.</p>"
    xs, ys = [p["latency"] for _, p, _ in pts], [p["value"] for _, p, _ in pts]
    x0, x1 = 0.0, max(xs) * 1.15
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.15 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 84, 40, 20, 45
    digits = max(4, min(9, 3 + int(math.ceil(-math.log10((y1 - y0) / max(abs(y1), abs(y0), 1e-12))))))
    sx = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (h - T - B)
    out = [f'<svg role="img" aria-label="{_e(metric)} against p50 latency" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
           f'<rect x="{L}" y="{T}" width="{w - L - R}" height="{h - T - B}" fill="#f9fafb" stroke="#d1d5db"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{h - B + 16}" font-size="11" text-anchor="middle">{xv:.4g}</text>')
        out.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.{digits}g}</text>')
    out.append(f'<text x="{(L + w - R) / 2}" y="{h - 8}" font-size="12" text-anchor="middle">p50 latency (ms) →</text>')
    out.append(f'<text x="12" y="{(T + h - B) / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 12 {(T + h - B) / 2})">'
               f'{_e(metric)} ({"higher" if higher else "lower"} is better)</text>')
    for name, p, colour in pts:
        cx, cy = sx(p["latency"]), sy(p["value"])
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colour}"><title>{_e(name)}: {p["value"]:.4g} at {p["latency"]:.4g} ms</title></circle>')
        out.append(f'<text x="{cx + 9:.1f}" y="{cy - 7:.1f}" font-size="11">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _bars(rows: list[tuple[str, float | None, str]], unit: str, w: int = 560) -> str:
    rows = [(n, v, c) for n, v, c in rows if v is not None]
    if not rows:
        return "<p>–</p>"
    top = max(v for _, v, _ in rows) or 1.0
    bh, L = 22, 190
    h = bh * len(rows) + 10
    out = [f'<svg role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}">']
    for i, (name, v, colour) in enumerate(rows):
        y = 5 + i * bh
        bw = v / top * (w - L - 80)
        out.append(f'<text x="{L - 6}" y="{y + 15}" font-size="11" text-anchor="end">{_e(name)}</text>')
        out.append(f'<rect x="{L}" y="{y + 3}" width="{bw:.1f}" height="{bh - 6}" fill="{colour}"/>')
        out.append(f'<text x="{L + bw + 5:.1f}" y="{y + 15}" font-size="11">{v:.4g} {unit}</text>')
    out.append("</svg>")
    return "".join(out)


def _distribution(series: list[tuple[str, list[float], str]], w: int = 560) -> str:
    """Each series' raw latency samples as a strip of ticks with its p50 marked, on one shared axis."""
    series = [(n, v, c) for n, v, c in series if v]
    if not series:
        return "<p>No raw latency samples.</p>"
    lo = min(min(v) for _, v, _ in series)
    hi = max(max(v) for _, v, _ in series)
    lo, hi = lo * 0.95, hi * 1.05 if hi > lo else lo + 1
    L, R, rh = 190, 20, 28
    h = rh * len(series) + 30
    sx = lambda x: L + (x - lo) / (hi - lo) * (w - L - R)
    out = [f'<svg role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}">']
    for i, (name, vals, colour) in enumerate(series):
        y = 8 + i * rh
        out.append(f'<text x="{L - 6}" y="{y + 14}" font-size="11" text-anchor="end">{_e(name)}</text>')
        for v in vals:
            out.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{y + 3}" y2="{y + 19}" stroke="{colour}" stroke-opacity="0.45"/>')
        med = sorted(vals)[len(vals) // 2]
        out.append(f'<line x1="{sx(med):.1f}" x2="{sx(med):.1f}" y1="{y}" y2="{y + 22}" stroke="#111827" stroke-width="2"/>')
    for i in range(5):
        xv = lo + (hi - lo) * i / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{h - 6}" font-size="11" text-anchor="middle">{xv:.3g} ms</text>')
    out.append("</svg>")
    return "".join(out)


def _gates(r: dict[str, Any]) -> str:
    gates = r.get("gates") or []
    if not gates:
        return "<p>No gates.</p>"
    rows = []
    for g in gates:
        res, colour = {True: ("pass", PASS_C), False: ("FAIL", FAIL_C), None: ("n/a", NA_C)}[g["passed"]]
        rows.append(f'<tr><td>{_e(g["name"])}</td><td class="n">{_n(g.get("threshold"))}</td><td class="n">{_n(g.get("value"))}</td>'
                    f'<td class="gate" style="background:{colour}">{res}</td><td>{_e(g.get("note") or g.get("meaning") or "")}</td></tr>')
    return ("<table><tr><th>gate</th><th>threshold</th><th>value</th><th>result</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def _sweep(r: dict[str, Any]) -> str:
    sweep = ((r.get("slimmed") or {}).get("bench") or {}).get("sweep") or r.get("sweep")
    if not sweep:
        return ""
    rows = "".join(f'<tr><td class="n">{_e(s.get("batch_size"))}</td><td class="n">{_n(s.get("p50_ms"))}</td>'
                   f'<td class="n">{_n(s.get("p95_ms"))}</td><td class="n">{_n(s.get("samples_per_s"))}</td>'
                   f'<td class="n">{_n(s.get("peak_memory_mb"))}</td><td>{_e(s.get("status", "ok"))}</td></tr>' for s in sweep)
    return ("<h2>Batch sweep</h2><table><tr><th>batch</th><th>p50 ms</th><th>p95 ms</th><th>samples/s</th><th>peak MB</th>"
            f"<th>status</th></tr>{rows}</table>")


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#111827}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #e5e7eb;padding:4px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.gate{color:#fff;font-weight:600;text-align:center}.verdict{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff}
.grid{display:flex;flex-wrap:wrap;gap:24px}.warn{background:#fef3c7;padding:6px 10px;border-left:4px solid #d97706;margin:4px 0}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}.pareto{font-weight:700}"""


def render(reports: list[dict[str, Any]], title: str | None = None, notes: list[str] | None = None) -> str:
    """The page for one report (a run) or several (a comparison, Pareto-optimal rows marked)."""
    first = reports[0]
    base = point(first, "baseline")
    slims = [point(r) for r in reports]
    names = [label(r) for r in reports]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    front = pareto([base] + slims)
    metric = next((p["metric"] for p in [base] + slims if p["metric"]), "accuracy")
    higher = next((p["higher"] for p in [base] + slims if p["metric"]), True)
    model = (first.get("model") or {}).get("source", "?")
    verdicts = {True: ("PASSED", PASS_C), False: ("FAILED", FAIL_C), None: ("NO GATES", NA_C)}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title or f'slimctl · {model}')}</title>"
             f"<style>{CSS}</style></head><body>"]
    if len(reports) == 1:
        v, c = verdicts[first.get("passed")]
        parts.append(f"<h1>slimctl · {_e(model)} · {_e(names[0])} <span class='verdict' id='verdict' style='background:{c}'>{v}</span></h1>")
        d = first.get("delta") or {}
        keys = [k for k in ("speedup", "decode_speedup", "prefill_speedup", "perplexity_ratio", "fidelity", "size_ratio",
                            "peak_memory_ratio") if d.get(k) is not None]
        parts.append("<p>" + " · ".join(f"<b>{k}</b> <span class='num' data-key='{k}'>{_n(d[k])}</span>" for k in keys) + "</p>")
    else:
        parts.append(f"<h1>slimctl comparison · {_e(model)} · {len(reports)} runs</h1>")
    for w in ((first.get("warnings") or []) if len(reports) == 1 else []) + list(notes or []):
        parts.append(f"<div class='warn'>{_e(w)}</div>")
    # summary table
    rows = [f"<tr class='{'pareto' if front[0] else ''}'><td>baseline</td><td class='n'>{_n(base['value'])}</td><td class='n'>{_n(base['latency'])}</td>"
            f"<td class='n'>{_n(base['size'])}</td><td class='n'>{_n(base['memory'])}</td><td>–</td><td>{'yes' if front[0] else ''}</td></tr>"]
    for i, (r, p, n) in enumerate(zip(reports, slims, names)):
        v, c = verdicts[r.get("passed")]
        rows.append(f"<tr class='{'pareto' if front[i + 1] else ''}'><td>{_e(n)}</td><td class='n'>{_n(p['value'])}</td>"
                    f"<td class='n'>{_n(p['latency'])}</td><td class='n'>{_n(p['size'])}</td><td class='n'>{_n(p['memory'])}</td>"
                    f"<td class='gate' style='background:{c}'>{v}</td><td>{'yes' if front[i + 1] else ''}</td></tr>")
    parts.append(f"<h2>Summary</h2><table id='summary'><tr><th>model</th><th>{_e(metric)}</th><th>p50 latency ms</th>"
                 "<th>size MB</th><th>peak memory MB</th><th>gates</th><th>Pareto-optimal</th></tr>" + "".join(rows) + "</table>")
    colours = [BASE_C] + [SLIM_C] * len(slims)
    parts.append("<div class='grid'><div><h2>Accuracy against latency</h2>"
                 + _scatter([("baseline", base, BASE_C)] + [(n, p, SLIM_C) for n, p in zip(names, slims)], metric, higher)
                 + "</div><div><h2>Latency distribution (raw samples, p50 marked)</h2>"
                 + _distribution([("baseline", base["samples"], BASE_C)] + [(n, p["samples"], SLIM_C) for n, p in zip(names, slims)])
                 + "</div><div><h2>Size on disk</h2>"
                 + _bars([("baseline", base["size"], BASE_C)] + [(n, p["size"], c) for n, p, c in zip(names, slims, colours[1:])], "MB")
                 + "</div><div><h2>Peak memory</h2>"
                 + _bars([("baseline", base["memory"], BASE_C)] + [(n, p["memory"], c) for n, p, c in zip(names, slims, colours[1:])], "MB")
                 + "</div></div>")
    for r, n in zip(reports, names):
        parts.append(f"<h2>Gates · {_e(n)}</h2>" + _gates(r) + _sweep(r))
    env = first.get("environment") or {}
    flat = {**{k: v for k, v in env.items() if not isinstance(v, dict)}, **(env.get("versions") or {})}
    parts.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in flat.items())
                 + "</table></body></html>")
    return "".join(parts)

