"""Bench sweeps across batch sizes (or `auto`: grow until memory runs out or throughput stops
improving, then bisect) and dtypes, each point in a fresh process, and the recommendation that follows
(cost and placement: cost.py; the study that runs a sweep: study.py)."""
from __future__ import annotations

from typing import Callable

from ..errors import SlimctlError, UsageError
from ..results.report import BenchResult
from ..results.study import Recommendation, SweepRow
from ..specs import BenchSpec

AUTO_MAX_BATCH = 256  # auto never goes past this; ask for larger sizes explicitly
GAIN = 1.10  # auto: a doubling that adds less than 10 % throughput does not pay


def parse_sizes(text: str) -> list[int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--batch-sizes takes a comma list of integers or 'auto', not {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 4096:
        raise UsageError("--batch-sizes must lie in 1..4096")
    return sizes


def _row(batch: int, cast: str | None, res: BenchResult | None, error: str | None = None) -> SweepRow:
    if res is None:
        return SweepRow(batch_size=batch, dtype=cast or "as saved", cast=cast,
                        status="out of memory" if error and "memory" in error else "error", error=error)
    return SweepRow(batch_size=batch, dtype=res.dtype or cast, cast=cast, status="ok", p50_ms=res.latency_ms.p50,
                    p95_ms=res.phases[res.latency_of].latency_ms.p95, samples_per_s=res.throughput.samples_per_s, tokens_per_s=res.throughput.tokens_per_s,
                    decode_tokens_per_s=res.decode_tokens_per_s, peak_memory_mb=res.peak_memory_mb, result=res)


def sweep(measure: Callable[[BenchSpec], BenchResult], spec: BenchSpec, sizes: list[int] | str, dtype: str | None,
          max_memory_mb: float | None, say=lambda m: None) -> list[SweepRow]:
    """Measure each batch size; `auto` doubles from 1 and, on running out of memory, bisects between
    the last size that fit and the first that did not."""

    def point(b: int) -> SweepRow:
        say(f"batch {b}" + (f" ({dtype})" if dtype else ""))
        try:
            row = _row(b, dtype, measure(spec.model_copy(update={"batch_size": b})))
        except SlimctlError as e:
            return _row(b, dtype, None, str(e))
        if max_memory_mb is not None and row.peak_memory_mb > max_memory_mb:
            row.status = "out of memory"
            row.error = f"peak {row.peak_memory_mb:.0f} MB exceeds --max-memory {max_memory_mb:g} MB"
        return row

    if sizes != "auto":
        rows = []
        for b in sizes:
            rows.append(point(b))
            if rows[-1].status == "out of memory":
                break  # larger batches need more memory still
        return rows
    rows, b, best, flat = [], 1, 0.0, 0
    while b <= AUTO_MAX_BATCH:
        r = point(b)
        rows.append(r)
        if r.status != "ok":
            lo = b // 2
            hi = b
            while hi - lo > max(1, lo // 4) and lo >= 1:  # bisect down to a quarter of the last good size
                mid = (lo + hi) // 2
                m = point(mid)
                rows.append(m)
                lo, hi = (mid, hi) if m.status == "ok" else (lo, mid)
            break
        tput = r.samples_per_s
        flat = flat + 1 if best and tput < best * GAIN else 0
        if flat == 2:
            break  # the knee: two doublings in a row no longer paid
        best = max(best, tput)
        b *= 2
    return sorted(rows, key=lambda r: r.batch_size)


def recommend(rows: list[SweepRow], slo_p95_ms: float | None) -> Recommendation | None:
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return None
    if slo_p95_ms is not None:
        meet = [r for r in ok if r.p95_ms <= slo_p95_ms]
        if not meet:
            fastest = min(ok, key=lambda r: r.p95_ms)
            return Recommendation(reason=f"no batch size meets p95 <= {slo_p95_ms:g} ms; the lowest p95 is "
                                  f"{fastest.p95_ms:.1f} ms at batch {fastest.batch_size} ({fastest.dtype})")
        r = max(meet, key=lambda r: r.samples_per_s)
        return Recommendation(batch_size=r.batch_size, dtype=r.dtype, reason=f"highest throughput ({r.samples_per_s:.1f} "
                              f"samples/s) whose p95 {r.p95_ms:.1f} ms meets the {slo_p95_ms:g} ms SLO")
    top = max(r.samples_per_s for r in ok)
    knee = min((r for r in ok if r.samples_per_s >= 0.9 * top), key=lambda r: (r.batch_size, r.p95_ms))
    return Recommendation(batch_size=knee.batch_size, dtype=knee.dtype,
                          reason=f"the throughput knee: smallest batch within 10 % of the best throughput ({knee.samples_per_s:.1f} "
                                 f"of {top:.1f} samples/s), so latency stays as low as that throughput allows (no --slo-p95-ms given)")
