"""Measurement primitives: latency samples with their statistics, a timed loop, and peak memory."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..machine import (  # noqa: F401  (measurement's interface)
    PeakMemory, cpu_flags, cpu_name, env_threads, physical_cpus, release_freed_memory, rss_mb, torch_threads)


@dataclass
class Latency:
    """Raw samples in milliseconds plus the statistics derived from them."""

    values_ms: list[float]
    unit: str = "ms"

    @classmethod
    def from_values(cls, values_ms: list[float]) -> "Latency":
        if not values_ms:
            raise ValueError("no latency samples")
        return cls(list(values_ms))

    def pct(self, q: float) -> float:
        v = sorted(self.values_ms)
        if len(v) == 1:
            return v[0]
        pos = (len(v) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values_ms)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "count": len(self.values_ms), "mean": self.mean, "p50": self.pct(50),
                "p90": self.pct(90), "p95": self.pct(95), "p99": self.pct(99),
                "stdev": statistics.stdev(self.values_ms) if len(self.values_ms) > 1 else 0.0,
                "min": min(self.values_ms), "max": max(self.values_ms), "values": [round(x, 4) for x in self.values_ms]}


class Timer:
    """Wall time of a block; on CUDA, synchronises so queued kernels are counted."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.ms = (time.perf_counter() - self.t0) * 1000


def run_until(fn: Callable[[], None], warmup: int, min_iters: int, min_seconds: float) -> int:
    """Warm up, then call fn until both a minimum count and a minimum duration are reached."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return n


@dataclass
class Phase:
    """One measured phase (e.g. forward, prefill, decode step)."""

    name: str
    latency: Latency
    peak_memory_mb: float
    items_per_call: float  # samples per call
    tokens_per_call: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        mean_s = self.latency.mean / 1000
        return {"latency_ms": self.latency.to_dict(), "peak_memory_mb": round(self.peak_memory_mb, 1),
                "samples_per_s": self.items_per_call / mean_s, "tokens_per_s": self.tokens_per_call / mean_s,
                "items_per_call": self.items_per_call, "tokens_per_call": self.tokens_per_call, **self.extra}

    @classmethod
    def pooled(cls, name: str, parts: list) -> "Phase":
        """One phase from several runs' measurements of it (results.report.PhaseResult): raw samples pooled,
        peak memory the highest."""
        values = [v for p in parts for v in p.latency_ms.values]
        return cls(name, Latency.from_values(values), max(p.peak_memory_mb for p in parts),
                   parts[0].items_per_call, parts[0].tokens_per_call, dict(parts[0].model_extra or {}))
