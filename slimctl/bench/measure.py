"""Measurement primitives: latency samples with their statistics, a timed loop, and peak memory."""
from __future__ import annotations

import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


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


def _status_kb(field_name: str) -> int | None:
    try:
        m = re.search(rf"{field_name}:\s+(\d+) kB", open("/proc/self/status").read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory of one phase, in MB.

    CPU: the process RSS high-water mark, reset at the start of the phase through
    /proc/self/clear_refs (Linux); elsewhere a 5 ms sampling thread stands in.
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = 0.0
        self.method = ""

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self._start_sampler()
        return self

    def _start_sampler(self):
        import psutil

        proc, stop, peak = psutil.Process(), threading.Event(), [0]

        def loop():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(0.005)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self._sampler = (t, stop, peak)
        self.method = "RSS sampled every 5 ms"

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._sampler:
            t, stop, peak = self._sampler
            stop.set()
            t.join()
            self.peak_mb = peak[0] / 2**20
        else:
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so that a peak RSS measures live memory and not
    what loading left behind (e.g. a skeleton whose weights were replaced from disk)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


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
    def pooled(cls, name: str, parts: list[dict]) -> "Phase":
        """One phase from several runs' phase dicts: raw samples pooled, peak memory the highest."""
        values = [v for p in parts for v in p["latency_ms"]["values"]]
        extra = {k: v for k, v in parts[0].items() if k not in
                 ("latency_ms", "peak_memory_mb", "samples_per_s", "tokens_per_s", "items_per_call", "tokens_per_call")}
        return cls(name, Latency.from_values(values), max(p["peak_memory_mb"] for p in parts),
                   parts[0]["items_per_call"], parts[0]["tokens_per_call"], extra)


def env_threads() -> int:
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def physical_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
