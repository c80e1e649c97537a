"""What a measured throughput costs per million tokens or samples at a stated hourly price, and where (CPU or GPU) a
model is cheapest to serve within a latency objective."""
from __future__ import annotations

from ..errors import UsageError
from ..results.report import BenchResult
from ..results.study import BenchStudy, Cost, Placement, PlacementRow


# Examples only, printed as such: the user's own price belongs in --hourly-cost.
EXAMPLE_HOURLY_USD = {"cpu": 0.10, "cuda": 2.50}


def cost(result: BenchResult, kind_is_lm: bool, device: str, hourly_usd: float | None) -> Cost:
    """USD per 1M generated tokens (causal LM, decode throughput) or per 1M samples."""
    example = hourly_usd is None
    price = EXAMPLE_HOURLY_USD[device] if example else hourly_usd
    per_s = price / 3600
    assumption = f"EXAMPLE price {price:g} USD/h for {device}: set --hourly-cost" if example else f"{price:g} USD/h (--hourly-cost)"
    if kind_is_lm and result.decode_tokens_per_s:
        tps = result.throughput.tokens_per_s  # generated tokens per second of whole requests
        return Cost(hourly_usd=price, assumption=assumption, usd_per_1m_tokens=per_s / tps * 1e6,
                    basis=f"{tps:.1f} generated tokens/s over whole requests (prefill + decode) at batch {result.batch_size}")
    sps = result.throughput.samples_per_s
    return Cost(hourly_usd=price, assumption=assumption, usd_per_1m_samples=per_s / sps * 1e6,
                basis=f"{sps:.1f} samples/s at batch {result.batch_size}")


def parse_hourly(text: str | None, devices: list[str]) -> dict[str, float | None]:
    """`--hourly-cost`: one price for every device ("0.10") or one per device ("cpu=0.68,cuda=3.50")."""
    if text is None:
        return {d: None for d in devices}
    try:
        if "=" not in text:
            return {d: float(text) for d in devices}
        prices = {k.strip(): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise UsageError(f"--hourly-cost takes USD per hour: 0.10 or cpu=0.68,cuda=3.50; got {text!r}") from None
    if any(v < 0 for v in prices.values()) or set(prices) - set(devices):
        raise UsageError(f"--hourly-cost names {', '.join(sorted(prices))}; the devices measured are {', '.join(devices)}")
    return {d: prices.get(d) for d in devices}


def placement(by_device: dict[str, BenchStudy], slo_p95_ms: float | None) -> Placement:
    """Where to run this model: per device its headline p95 (whole request), whether that meets the
    SLO, and its cost; the choice is the cheapest device that meets the SLO (the cheapest when no
    SLO is given). Costs compare only when each was measured on its own device's throughput."""
    rows = {}
    for dev, r in by_device.items():
        if not r.bench or not r.cost:
            continue
        usd, unit = r.cost.per_1m
        p95 = r.bench.latency_ms.p95
        rows[dev] = PlacementRow(p95_ms=p95, meets_slo=None if slo_p95_ms is None else p95 <= slo_p95_ms, usd_per_1m=usd,
                                 unit=unit, hourly_usd=r.cost.hourly_usd, example_price="EXAMPLE" in r.cost.assumption,
                                 batch_size=r.bench.batch_size)
    if not rows:
        return Placement(devices=rows, line="no device gave a result to compare")
    fits = [d for d, r in rows.items() if r.meets_slo is not False]
    parts = "; ".join(f"{d}: p95 {r.p95_ms:.1f} ms" + ("" if r.meets_slo is None else " (meets the SLO)" if r.meets_slo
                      else " (misses the SLO)") + f", {r.usd_per_1m:.4g} USD per 1M {r.unit} at {r.hourly_usd:g} USD/h"
                      + (" (EXAMPLE price)" if r.example_price else "") for d, r in rows.items())
    if not fits:
        return Placement(devices=rows, line=f"no device meets p95 <= {slo_p95_ms:g} ms. {parts}")
    choice = min(fits, key=lambda d: rows[d].usd_per_1m)
    why = (f"the cheapest that meets p95 <= {slo_p95_ms:g} ms" if slo_p95_ms is not None else "the cheapest per "
           f"{rows[choice].unit[:-1]} (no --slo-p95-ms given)")
    return Placement(devices=rows, choice=choice, line=f"place it on {choice}: {why}. {parts}")
