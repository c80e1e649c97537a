"""Latency, throughput and memory of one model: a forward pass for encoders and classifiers,
prefill plus greedy decode on the KV cache for causal LMs; optionally in a fresh process.

One model's bench, isolated runs and alternating rounds are in runner.py; studies (sweeps, cost,
placement) in study.py."""
from __future__ import annotations

from .decode import cache_of
from .runner import (
    DEFAULTS, FALLBACK_TEXT, settings_for, bench_model, summarize,
    pool, choose_mode, bench_isolated, alternate, pair_isolated,
)
from .study import bench_models

__all__ = ["cache_of", "DEFAULTS", "FALLBACK_TEXT", "settings_for", "bench_model", "summarize", "pool",
           "choose_mode", "bench_isolated", "alternate", "pair_isolated", "bench_models"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, "bench_models")  # slimctl.bench(...) is the API function
