"""Slimmed against baseline: the delta of a run (accuracy agreement, speed and size ratios, with the
per-round range that says whether a speed difference is real) and the warnings it implies."""
from __future__ import annotations

import math

from .report import BenchResult, Delta, EvalResult, KernelPlan


def _eval_delta(ev: EvalResult, d: Delta) -> None:
    for k, v in (ev.vs_reference or {}).items():  # perplexity_ratio, top1_agreement, kl_divergence, mean_cosine, ...
        setattr(d, k, v)
    if d.perplexity_ratio is not None:
        d.perplexity_increase_pct = (d.perplexity_ratio - 1) * 100
    d.fidelity = d.mean_cosine if d.mean_cosine is not None else d.top1_agreement
    d.tokens_scored = ev.settings.get("tokens_scored")
    if ev.tasks:
        drops = [t.drop_pct for t in ev.tasks.values() if t.drop_pct is not None]
        d.task_drop_pct = max(drops) if drops else None
    ref, cur = ev.reference_metrics or {}, ev.metrics or {}
    for k in ("topic_accuracy", "accuracy"):
        if k in ref and k in cur:
            setattr(d, f"{k}_change", cur[k] - ref[k])


def _bench_delta(bb: BenchResult, sb: BenchResult, d: Delta) -> None:
    d.speedup = bb.latency_ms.p50 / sb.latency_ms.p50
    rounds = list(zip(bb.rounds_p50_ms, sb.rounds_p50_ms))
    if len(rounds) > 1:  # each round's ratio; a range that straddles 1 means no measurable difference
        ratios = [b / s for b, s in rounds]
        d.speedup_range = [min(ratios), max(ratios)]
        d.speedup_within_noise = min(ratios) <= 1 <= max(ratios)
    d.throughput_ratio = sb.throughput.samples_per_s / bb.throughput.samples_per_s
    d.peak_memory_ratio = sb.peak_memory_mb / bb.peak_memory_mb if bb.peak_memory_mb else None
    if bb.decode_tokens_per_s is not None:
        d.decode_speedup = sb.decode_tokens_per_s / bb.decode_tokens_per_s
        d.prefill_speedup = bb.prefill_ms.p50 / sb.prefill_ms.p50
        for mode, base_run in (bb.modes or {}).items():  # the slimmed path vs each baseline path
            setattr(d, f"decode_speedup_vs_{mode}_baseline", sb.decode_tokens_per_s / base_run.decode_tokens_per_s)
            setattr(d, f"speedup_vs_{mode}_baseline", base_run.latency_ms.p50 / sb.latency_ms.p50)
    if bb.size_mb:
        d.size_ratio = sb.size_mb / bb.size_mb


def delta(ev: EvalResult | None, bb: BenchResult | None, sb: BenchResult | None) -> Delta:
    """The report's delta from the side-by-side eval and the two bench results (any may be absent)."""
    d = Delta()
    if ev:
        _eval_delta(ev, d)
    if bb and sb:
        _bench_delta(bb, sb, d)
    return d


def warnings(d: Delta, notes: list[str], slim_bench: BenchResult | None = None) -> list[str]:
    """Notes from the steps and eval, plus what the delta says a user must hear (slower, within noise)."""
    w = list(notes)
    broken = [k for k, v in d.model_dump(exclude_unset=True).items() if isinstance(v, float) and not math.isfinite(v)]
    if broken:
        w.append(f"{', '.join(broken[:4])} {'is' if len(broken) == 1 else 'are'} NaN or Inf: the slimmed model produces "
                 "non-finite outputs on the eval data, so its accuracy cannot be compared")
    if slim_bench and slim_bench.onnx_cpu_fallback:
        w.append("onnxruntime's CUDA execution provider has no kernel for some nodes of this graph (int8 ops usually): "
                 "they run on the CPU, with copies each way")
    if d.speedup_within_noise:
        lo, hi = d.speedup_range
        w.append(f"the speed difference is within run-to-run noise (per-round speedup {lo:.2f}x to {hi:.2f}x)")
    elif d.speedup is not None and d.speedup < 1:
        w.append(f"the slimmed model is slower than its baseline ({d.speedup:.2f}x at p50)")
    if d.decode_speedup is not None and d.decode_speedup < 1:
        w.append(f"the slimmed model decodes slower than its baseline ({d.decode_speedup:.2f}x tokens/s)")
    w.extend(slim_bench.notes if slim_bench else [])  # e.g. compile auto fell back to eager
    return w


def kernel_warnings(eval_plan: KernelPlan | None, slim_bench: BenchResult | None) -> list[str]:
    """The dequantize-path count (once), and a mismatch between the eval's and the bench's dtype."""
    plans = [p for p in (eval_plan, slim_bench.kernels if slim_bench else None) if p]
    out = []
    if plans and plans[-1].warning:
        out.append(plans[-1].warning)
    if eval_plan and slim_bench and slim_bench.dtype and slim_bench.dtype != eval_plan.act_dtype:
        out.append(f"accuracy was measured with {eval_plan.act_dtype} activations on the CPU, the bench ran "
                   f"{slim_bench.dtype} on {slim_bench.device}")
    return out
