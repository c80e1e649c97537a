"""Where a recipe step's time goes: named stages (calibration forwards, input statistics, Hessian
factorisation, solves, searches, sensitivity passes, I/O), each with the seconds it took and the
floating-point operations it did, collected for the step that is running and reported beside the step's
time as a rate and, where the machine's matmul peak is known, as a share of that peak.

Stages nest: a stage's seconds are its own (exclusive): the time of stages opened inside it (a statistics
hook inside a calibration forward) goes to them. Code outside any collection pays one context-variable read."""
from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Any, Iterator

FORWARD = "calibration forward"  # blocks run over the calibration inputs
STATISTICS = "input statistics"  # X^T X, norms, maxima gathered by hooks
FACTOR = "hessian factorisation"  # Cholesky / inverse of H
SOLVE = "solve"  # GPTQ / SparseGPT column updates, least-squares refits
SEARCH = "scale and clip search"  # AWQ's grids
SENSITIVITY = "sensitivity"  # mixed's per-Linear costs
ROUND = "rounding and packing"
ERROR = "output error check"  # ‖(W − Ŵ)X‖² / ‖WX‖² per layer, via H

_current: contextvars.ContextVar["Stages | None"] = contextvars.ContextVar("slimctl_stages", default=None)


class Stages:
    """Seconds (exclusive) and FLOPs per stage name, in the order stages were first opened."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self._open: list[list] = []  # [name, start, seconds spent in stages opened inside]

    def enter(self, name: str) -> None:
        self.seconds.setdefault(name, 0.0)
        self._open.append([name, time.perf_counter(), 0.0])

    def exit(self) -> None:
        name, start, inner = self._open.pop()
        took = time.perf_counter() - start
        self.seconds[name] += took - inner
        if self._open:
            self._open[-1][2] += took

    def add_flops(self, name: str, n: float) -> None:
        self.seconds.setdefault(name, 0.0)
        self.flops[name] = self.flops.get(name, 0.0) + n

    def record(self, total_seconds: float, peak_flops: float | None = None) -> list[dict[str, Any]]:
        """One row per stage (seconds, share of the step, GFLOP, GFLOP/s, % of the matmul peak) and a row
        for the time no stage claimed (Python between the stages, loading, bookkeeping)."""
        rows = []
        for name, s in self.seconds.items():
            row: dict[str, Any] = {"stage": name, "seconds": round(s, 3),
                                   "share": round(s / total_seconds, 4) if total_seconds > 0 else None}
            f = self.flops.get(name)
            if f:
                row["gflop"] = round(f / 1e9, 2)
                if s > 0:
                    row["gflops_per_s"] = round(f / s / 1e9, 2)
                    if peak_flops:
                        row["pct_of_matmul_peak"] = round(100 * f / s / peak_flops, 1)
            rows.append(row)
        rest = total_seconds - sum(self.seconds.values())
        if rows:
            rows.append({"stage": "other", "seconds": round(max(rest, 0.0), 3),
                         "share": round(max(rest, 0.0) / total_seconds, 4) if total_seconds > 0 else None})
        return rows


@contextmanager
def collecting() -> Iterator[Stages]:
    """Collect the stages of the code run inside (one recipe step)."""
    st = Stages()
    token = _current.set(st)
    try:
        yield st
    finally:
        _current.reset(token)


def _sync() -> None:
    """Wait for queued GPU work when CUDA is in use (calibration on a GPU, techniques/placement.py), so that a
    stage's seconds are its kernels' and not their launches'. One flag read when CUDA is not initialised."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage(name: str, flops: float = 0.0) -> Iterator[None]:
    """Time the code inside as stage `name` (and count `flops` for it) when a step is being collected."""
    st = _current.get()
    if st is None:
        yield
        return
    _sync()
    st.enter(name)
    try:
        yield
    finally:
        _sync()
        st.exit()
        if flops:
            st.add_flops(name, flops)


def add_flops(name: str, n: float) -> None:
    """Count `n` floating-point operations for stage `name` (when collecting)."""
    st = _current.get()
    if st is not None:
        st.add_flops(name, n)


def linear_flops(module, tokens: int) -> float:
    """Multiply-adds x 2 of every Linear-like weight inside `module` over `tokens` tokens (attention's own
    products are added by calibrate.block_flops)."""
    n = 0
    for m in module.modules():
        if _is_embedding(m):
            continue
        if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int):
            n += m.in_features * m.out_features  # Linear, and quantized layers whose weight is packed
            continue
        w = getattr(m, "weight", None)
        if w is not None and getattr(w, "dim", lambda: 0)() == 2:
            n += w.numel()
    return 2.0 * n * tokens


def _is_embedding(m) -> bool:
    return type(m).__name__ in ("Embedding", "EmbeddingBag")
