"""One self-contained HTML page for one or more reports: no scripts, no network, plots as inline SVG
(accuracy against latency, size and peak-memory bars, latency distributions, gates, environment)."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from ..results.gates import quality_of
from ..results.report import Report, Side, as_report, pareto_front
from .markdown import fmt as _n  # one number format for Markdown and HTML

BASE_C, SLIM_C, PASS_C, FAIL_C, NA_C = "#6b7280", "#2563eb", "#15803d", "#b91c1c", "#9ca3af"
VERDICTS = {True: ("PASSED", PASS_C), False: ("FAILED", FAIL_C), None: ("NO GATES", NA_C)}


def _e(x: Any) -> str:
    return html.escape(str(x))


def label(r: Report) -> str:
    return r.recipe.get("name") or "+".join(s.get("method", "?") for s in r.recipe.get("steps", [])) or "run"


@dataclass
class Point:
    """The numbers of one side of a report that the plots and tables use."""
    latency: float | None = None
    size: float | None = None
    memory: float | None = None
    metric: str | None = None
    value: float | None = None
    higher: bool = True
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, side: Side) -> "Point":
        b = side.bench
        q = quality_of(side.eval.metrics if side.eval else None)
        phase = b.phases.get(b.latency_of) if b else None
        return cls(latency=b.latency_ms.p50 if b else None, size=b.size_mb if b else None,
                   memory=b.peak_memory_mb if b else None, metric=q[0] if q else None, value=q[1] if q else None,
                   higher=q[2] if q else True, samples=(phase.latency_ms.values if phase else None) or [])


def pareto(points: list[Point]) -> list[bool]:
    """True for points no other point beats on both latency (lower) and the metric (better)."""
    return pareto_front([None if p.latency is None or p.value is None
                         else (p.latency, -p.value if p.higher else p.value) for p in points])


def _scatter(pts: list[tuple[str, Point, str]], metric: str, higher: bool, w: int = 560, h: int = 320) -> str:
    pts = [(n, p, c) for n, p, c in pts if p.latency is not None and p.value is not None]
    if not pts:
        return "<p>No accuracy and latency to plot.</p>"
    xs, ys = [p.latency for _, p, _ in pts], [p.value for _, p, _ in pts]
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
        cx, cy = sx(p.latency), sy(p.value)
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colour}"><title>{_e(name)}: {p.value:.4g} at {p.latency:.4g} ms</title></circle>')
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


def _gates(r: Report) -> str:
    if not r.gates:
        return "<p>No gates.</p>"
    rows = []
    for g in r.gates:
        res, colour = {True: ("pass", PASS_C), False: ("FAIL", FAIL_C), None: ("n/a", NA_C)}[g.passed]
        rows.append(f'<tr><td>{_e(g.name)}</td><td class="n">{_n(g.threshold)}</td><td class="n">{_n(g.value)}</td>'
                    f'<td class="gate" style="background:{colour}">{res}</td><td>{_e(g.note or g.meaning or "")}</td></tr>')
    return ("<table><tr><th>gate</th><th>threshold</th><th>value</th><th>result</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#111827}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #e5e7eb;padding:4px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.gate{color:#fff;font-weight:600;text-align:center}.verdict{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff}
.grid{display:flex;flex-wrap:wrap;gap:24px}.warn{background:#fef3c7;padding:6px 10px;border-left:4px solid #d97706;margin:4px 0}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}.pareto{font-weight:700}"""


def render(reports: list[Report | dict[str, Any]], title: str | None = None, notes: list[str] | None = None) -> str:
    """The page for one report (a run) or several (a comparison, Pareto-optimal rows marked)."""
    reports = [as_report(r) for r in reports]
    first = reports[0]
    base = Point.of(first.baseline)
    slims = [Point.of(r.slimmed) for r in reports]
    names = [label(r) for r in reports]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    model = first.model.source
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title or f'slimctl · {model}')}</title>"
             f"<style>{CSS}</style></head><body>", _heading(reports, names)]
    for w in (first.warnings if len(reports) == 1 else []) + list(notes or []):
        parts.append(f"<div class='warn'>{_e(w)}</div>")
    metric, higher = next(((p.metric, p.higher) for p in [base] + slims if p.metric), ("accuracy", True))
    parts.append(_summary(reports, base, slims, names, metric))
    parts.append(_plots(base, slims, names, metric, higher))
    for r, n in zip(reports, names):
        parts.append(f"<h2>Gates · {_e(n)}</h2>" + _gates(r))
    env = first.environment
    flat = {**{k: v for k, v in env.model_dump(exclude_unset=True).items() if not isinstance(v, dict)}, **env.versions}
    parts.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in flat.items())
                 + "</table></body></html>")
    return "".join(parts)


def _heading(reports: list[Report], names: list[str]) -> str:
    """One run: its verdict and headline deltas; several: a comparison title."""
    first, model = reports[0], reports[0].model.source
    if len(reports) > 1:
        return f"<h1>slimctl comparison · {_e(model)} · {len(reports)} runs</h1>"
    v, c = VERDICTS[first.passed]
    keys = [k for k in ("speedup", "decode_speedup", "prefill_speedup", "perplexity_ratio", "fidelity", "size_ratio",
                        "peak_memory_ratio") if getattr(first.delta, k) is not None]
    return (f"<h1>slimctl · {_e(model)} · {_e(names[0])} <span class='verdict' id='verdict' style='background:{c}'>{v}</span></h1>"
            "<p>" + " · ".join(f"<b>{k}</b> <span class='num' data-key='{k}'>{_n(getattr(first.delta, k))}</span>"
                               for k in keys) + "</p>")


def _summary(reports: list[Report], base: Point, slims: list[Point], names: list[str], metric: str) -> str:
    front = pareto([base] + slims)
    rows = [f"<tr class='{'pareto' if front[0] else ''}'><td>baseline</td><td class='n'>{_n(base.value)}</td><td class='n'>{_n(base.latency)}</td>"
            f"<td class='n'>{_n(base.size)}</td><td class='n'>{_n(base.memory)}</td><td>–</td><td>{'yes' if front[0] else ''}</td></tr>"]
    for i, (r, p, n) in enumerate(zip(reports, slims, names)):
        v, c = VERDICTS[r.passed]
        rows.append(f"<tr class='{'pareto' if front[i + 1] else ''}'><td>{_e(n)}</td><td class='n'>{_n(p.value)}</td>"
                    f"<td class='n'>{_n(p.latency)}</td><td class='n'>{_n(p.size)}</td><td class='n'>{_n(p.memory)}</td>"
                    f"<td class='gate' style='background:{c}'>{v}</td><td>{'yes' if front[i + 1] else ''}</td></tr>")
    return (f"<h2>Summary</h2><table id='summary'><tr><th>model</th><th>{_e(metric)}</th><th>p50 latency ms</th>"
            "<th>size MB</th><th>peak memory MB</th><th>gates</th><th>Pareto-optimal</th></tr>" + "".join(rows) + "</table>")


def _plots(base: Point, slims: list[Point], names: list[str], metric: str, higher: bool) -> str:
    both = lambda read: [("baseline", read(base), BASE_C)] + [(n, read(p), SLIM_C) for n, p in zip(names, slims)]
    return ("<div class='grid'><div><h2>Accuracy against latency</h2>" + _scatter(both(lambda p: p), metric, higher)
            + "</div><div><h2>Latency distribution (raw samples, p50 marked)</h2>" + _distribution(both(lambda p: p.samples))
            + "</div><div><h2>Size on disk</h2>" + _bars(both(lambda p: p.size), "MB")
            + "</div><div><h2>Peak memory</h2>" + _bars(both(lambda p: p.memory), "MB") + "</div></div>")
