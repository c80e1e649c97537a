"""Terminal text for each result type: a function per type, data in, lines out (the CLI prints them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..results.report import BenchResult, GateRow, ModelEval, Report
from ..results.search import SearchResult
from ..results.study import BenchStudy, DeviceStudies, parse as parse_study


def num(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def pct(v) -> str:
    return "–" if v is None else f"{v:.2%}"


def run(report: Report) -> str:
    from .markdown import report as markdown

    art = report.artifact
    return (markdown(report) + f"\nreport:   {Path(art.path).parent / 'report.json'} (and report.md)\n"
            f"artifact: {art.path} (loads with {art.loads_with})")


def eval_result(data: dict[str, Any] | ModelEval) -> str:
    r = ModelEval.model_validate(data)
    n = r.settings.get("tokens_scored")
    lines = [f"{r.model} ({r.kind}) on {r.dataset}" + (f", {n:,} tokens scored" if n else "")]
    lines += [f"  {k}: {v:.6g}" for k, v in (r.metrics or {}).items()]
    lines += [f"  {k} vs {r.against}: {v:.6g}" for k, v in (r.vs_reference or {}).items()]
    for name, t in (r.tasks or {}).items():
        lines.append(f"  task {name} ({t.samples} docs, {t.source}):")
        for k, v in t.metrics.items():
            if k.endswith("_stderr"):
                continue
            se = t.metrics.get(f"{k}_stderr")
            line = f"    {k}: {v:.4f}" + (f" ± {se:.4f}" if se is not None else "")
            if (t.reference_metrics or {}).get(k) is not None:
                line += f"   ({r.against}: {t.reference_metrics[k]:.4f})"
            lines.append(line)
        if t.drop_pct is not None:
            lines.append(f"    {t.primary} drop vs {r.against}: {t.drop_pct:+.2f}%")
    return "\n".join(lines)


def bench(data: dict[str, Any] | BenchStudy | DeviceStudies) -> str:
    """`slimctl bench`: one device, several (placement), a sweep, or a what-if slimmed variant."""
    r = parse_study(data)
    if isinstance(r, DeviceStudies):
        return "\n".join([bench(sub) for sub in r.by_device.values()] + [f"placement: {r.placement.line}"])
    if r.slimmed:
        lines = [bench(r.model_copy(update={"slimmed": None})), f"slimmed variant ({r.slimmed.recipe}):", bench(r.slimmed)]
        v = r.slimmed.vs_baseline
        if v and v.speedup is not None:
            lines.append(f"  vs baseline: request {v.speedup:.2f}x" + (
                f", decode {v.decode_speedup:.2f}x, prefill {v.prefill_speedup:.2f}x" if v.decode_speedup is not None else "")
                + f", weights {v.weights_ratio:.2f}x, peak memory {v.peak_memory_ratio:.2f}x"
                + (" (within noise)" if v.within_noise else ""))
        return "\n".join(lines)
    lines = []
    if r.config_only:
        c = r.config_only
        lines.append(f"{c.architecture}: {(c.parameters or 0) / 1e9:.2f} B parameters, random weights (speed and memory only)")
    if r.sweep:
        lines += _sweep(r)
    if r.bench:
        lines += _bench_point(r, r.bench)
    if r.cost:
        val, unit = r.cost.per_1m
        lines.append(f"  cost: {val:.4g} USD per 1M {unit} ({r.cost.basis}; {r.cost.assumption})")
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _sweep(r: BenchStudy) -> list[str]:
    lines = [f"{'batch':>6} {'dtype':>10} {'p50 ms':>9} {'p95 ms':>9} {'samples/s':>10} {'tokens/s':>10} {'peak MB':>8}  status"]
    for s in r.sweep:
        if s.status == "ok":
            lines.append(f"{s.batch_size:>6} {s.dtype:>10} {s.p50_ms:>9.1f} {s.p95_ms:>9.1f} {s.samples_per_s:>10.2f} "
                         f"{s.tokens_per_s:>10.1f} {s.peak_memory_mb:>8.0f}  ok")
        else:
            lines.append(f"{s.batch_size:>6} {s.dtype:>10} {'':>9} {'':>9} {'':>10} {'':>10} {'':>8}  {s.status}: {s.error or ''}")
    rec = r.recommendation
    if rec:
        lines.append(f"recommended: batch {rec.batch_size} ({rec.dtype}): {rec.reason}")
    return lines


def _bench_point(r: BenchStudy, b: BenchResult) -> list[str]:
    lat, spread = b.latency_ms, b.spread_p50_ms
    lines = [f"{r.model} ({r.kind}) on {b.device}, {b.threads} threads, batch {b.batch_size} x {b.seq_len}, {b.dtype}",
             f"  {b.latency_of} latency ms: p50 {lat.p50:.2f}  p90 {lat.p90:.2f}  p99 {lat.p99:.2f}  (n={lat.count})"
             + (f"; p50 of {len(b.rounds_p50_ms)} fresh-process rounds {spread[0]:.2f}-{spread[1]:.2f}" if spread else "")]
    if b.prefill_ms:
        lines.append(f"  prefill p50 {b.prefill_ms.p50:.2f} ms ({b.prefill_tokens_per_s:.0f} tok/s)   decode "
                     f"{b.decode_tokens_per_s:.1f} tok/s" + (f" ({b.decode_mode})" if b.decode_mode else ""))
        for mode, m in (b.modes or {}).items():
            lines.append(f"    {mode:<8} request p50 {m.latency_ms.p50:.1f} ms, decode {m.decode_tokens_per_s:.1f} tok/s"
                         + (f", compiled in {m.compile_seconds:.0f} s (not in any latency)" if m.compile_seconds else ""))
    if b.kernels:
        k = b.kernels
        lines.append(f"  kernels: {k.fused_layers} fused ({', '.join(f'{n} {c}' for c, n in k.kernels.items()) or 'none'}), "
                     f"{k.dequantize_layers} dequantize; {k.act_dtype} activations")
    lines.append(f"  throughput {b.throughput.samples_per_s:.2f} samples/s, {b.throughput.tokens_per_s:.1f} tokens/s")
    lines.append(f"  peak memory {b.peak_memory_mb:.0f} MB   size {b.size_mb:.1f} MB")
    lines += _roofline(b.roofline or {})
    return lines


def _roofline(rf: dict[str, Any]) -> list[str]:
    """Fractions of the roofline floors. One above 100 % (the peak must be wrong) is not shown; fractions
    from peaks measured on a busy machine are shown with that said."""
    from ..results.report import floor_percentages

    if any(p > 100 for p in floor_percentages(rf)):
        return [f"  roofline: not shown, the peaks are suspect: {rf.get('suspect', 'a fraction above 100 %')}"]
    note = [f"  (roofline peaks suspect: {rf['suspect']})"] if rf.get("suspect") else []
    if "decode_pct_of_bandwidth_floor" in rf:
        return [f"  roofline: decode at {rf['decode_pct_of_bandwidth_floor']:.0f}% of the bandwidth floor ({rf['decode_floor_ms']:.2f} "
                f"ms/step at {rf['bandwidth_gb_s']:.1f} GB/s); prefill at {rf['prefill_pct_of_compute_floor']:.0f}% of the compute "
                f"floor ({rf['matmul_tflops']:.2f} TFLOP/s {rf['peaks_dtype']})"] + note
    if "forward_pct_of_compute_floor" in rf:
        return [f"  roofline: forward at {rf['forward_pct_of_compute_floor']:.0f}% of the compute floor "
                f"({rf['matmul_tflops']:.2f} TFLOP/s {rf['peaks_dtype']})"] + note
    return []


def gates(rows: list[GateRow]) -> str:
    lines = []
    for g in rows:
        res = {True: "pass", False: "FAIL", None: "n/a "}[g.passed]
        lines.append(f"{res}  {g.name:<26} value {num(g.value):<10} threshold {g.threshold:g}  {g.note or ''}")
    return "\n".join(lines)


def compare(d: dict[str, Any]) -> str:
    lines = [f"{'run':<28} {'metric':<16} {'value':>10} {'p50 ms':>10} {'size MB':>9} {'peak MB':>9}  pareto"]
    for r in d["runs"]:
        lines.append(f"{r['name'][:28]:<28} {str(r['metric'])[:16]:<16} {num(r['value']):>10} {num(r['latency_p50_ms']):>10} "
                     f"{num(r['size_mb']):>9} {num(r['peak_memory_mb']):>9}  {'*' if r['pareto'] else ''}")
    return "\n".join(lines)


def search(data: dict[str, Any] | SearchResult, out_dir: Path) -> str:
    r = SearchResult.model_validate(data)
    lines = [f"search on {r.model}: {r.metric} drop <= {r.max_drop:.2%}, objective {r.objective} "
             f"({'lower' if r.lower_is_better else 'higher'} is better), {r.seconds / 60:.1f} min",
             f"ranked by {r.ranked_by}" + _engine(r.engine),
             f"{'candidate':<34} {'status':<11} {'pre-drop':>9} {'drop':>9} {r.objective:>12} {'vs orig':>8}  budget  pareto"]
    several_nodes = len((r.engine or {}).get("nodes") or []) > 1  # then say where each candidate ran
    for c in r.candidates:
        vs = c.vs_original
        why = c.error or ""
        if c.same_as:
            why = f"same steps as {c.same_as}" + (f"; {why}" if why else "")
        if several_nodes and c.node:
            why = f"on {c.node.get('hostname')}" + (f"; {why}" if why else "")
        budget = "–" if c.meets_budget is None else "yes" if c.meets_budget else "no"
        lines.append(f"{c.name[:34]:<34} {c.status:<11} {pct(c.prefilter_drop):>9} {pct(c.drop):>9} "
                     f"{num(c.objective):>12} {('–' if vs is None else f'{vs:.2f}x'):>8}  {budget:<6}  "
                     f"{'*' if c.pareto else ' '}{'  ' + why if why else ''}")
    lines += [f"warning: {w}" for w in r.warnings]
    if r.winner:
        lines.append(f"winner: {r.winner} → {out_dir}/winner.yaml, {out_dir}/model, {out_dir}/report.json")
    return "\n".join(lines)


def _engine(e: dict[str, Any] | None) -> str:
    """`; engine ray at HOST:PORT, 2 CPUs per candidate, 3 nodes` (nothing for the local engine)."""
    if not e or e.get("engine") != "ray":
        return ""
    nodes = len(e.get("nodes") or [])
    return (f"; engine ray at {e['address']}, {e['task_cpus']:g} CPUs" + (f" + {e['task_gpus']} GPU" if e.get("task_gpus") else "")
            + f" per candidate, {nodes} node{'s' if nodes != 1 else ''}")


def export(r: dict[str, Any]) -> str:
    """`slimctl export`: what was written and how exactly."""
    tok = r.get("tokenizer") or {}
    return (f"wrote {r['path']} ({r['bytes'] / 2**20:.1f} MB): {', '.join(f'{n} {k}' for k, n in r['tensor_types'].items())}; "
            f"{r['exact_layers']} quantized layers packed exactly from their codes"
            + (f", {len(r['requantized'])} quantized again" if r["requantized"] else "")
            + (f"; tokenizer {tok.get('model')} (pre-tokenizer {tok.get('pre')}, {tok.get('n_vocab')} tokens)" if tok else ""))


def table(rows: list[dict[str, Any]], columns: list[tuple[str, int]]) -> str:
    """Rows as fixed-width columns (the last one unpadded): `slimctl models`, `slimctl methods`."""
    return "\n".join(" ".join(f"{str(r[k]):<{w}}" if w else str(r[k]) for k, w in columns) for r in rows)
