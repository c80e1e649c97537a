"""The machine a measurement runs on: CPU name, flags and cores, threads, and how much memory this
process holds (RSS now, its peak over a block of work). Used by bench, steps, kernels and reports."""
from __future__ import annotations

import contextlib
import os
import re
import threading

import torch


def status_kb(field_name: str) -> int | None:
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
            self.peak_mb = (status_kb("VmHWM") or 0) / 1024


class RssSampler:
    """Peak VmRSS and RssAnon of this process over a long phase, sampled every `every` seconds in a
    thread (VmHWM cannot serve: the steps inside reset it for their own peaks; add those to `peak_mb`)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_rss_mb, self.peak_anon_mb, self.peak_file_mb, self.samples = every, 0.0, 0.0, 0.0, 0
        self._stop = threading.Event()

    def _read(self) -> None:
        rss, anon, file = status_kb("VmRSS"), status_kb("RssAnon"), status_kb("RssFile")
        self.peak_rss_mb = max(self.peak_rss_mb, (rss or 0) / 1024)
        self.peak_anon_mb = max(self.peak_anon_mb, (anon or 0) / 1024)
        self.peak_file_mb = max(self.peak_file_mb, (file or 0) / 1024)
        self.samples += 1

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self._read()
                self._stop.wait(self.every)

        self._read()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()


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
    kb = status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def env_threads() -> int:
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` (None: left as they are) for the block, and given back after it: a
    thread count left behind changes every later matmul's summation order in the same process."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
