"""Roofline: the device's measured memory bandwidth (a streaming read and a copy) and matmul peak (a
large GEMM at the dtype), cached per machine only when measured on a quiet machine, and how close a
bench result comes to the floors they set: decode against the bytes it must read per step, prefill
against the FLOPs it must do. A fraction above 100 % triggers a re-measurement and is marked suspect."""
from __future__ import annotations

import json
import time
from typing import Any

import torch

from ..models import cache_dir, state_bytes
from ..kinds import CAUSAL_LM
from ..results.report import BenchResult, floor_percentages
from .measure import cpu_name, physical_cpus

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _key(device: str, dtype: str) -> str:
    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_name()
    return f"{device}|{name}|{dtype}|threads={torch.get_num_threads()}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


BUSY_SPREAD = 0.15  # two measurements of one peak further apart than this: the machine is busy
SIZES = {"cuda": (1 << 30, 8192), "cpu": (256 << 20, 1536)}  # bytes streamed, GEMM side (n x n)


def _best(fn, tries: int, device: str) -> float:
    """The fastest of `tries` timed calls of fn (seconds)."""
    best = float("inf")
    for _ in range(tries):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _bandwidth(device: str, tries: int) -> tuple[float, float]:
    """(read, copy) bandwidth in bytes/s: a streaming reduction reads each byte once, as decode reads
    weights; a copy reads and writes. Best of `tries` each."""
    nbytes = SIZES[device][0]
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    src.sum()  # warm-up: page the buffers in
    dst.copy_(src)
    read = nbytes / _best(lambda: src.sum(), tries, device)
    copy = 2 * nbytes / _best(lambda: dst.copy_(src), tries, device)
    return read, copy


def _gemm(device: str, dtype: str, tries: int) -> float:
    dt = DTYPES.get(dtype, torch.float32)
    n = SIZES[device][1]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    a @ b  # warm-up
    return 2 * n ** 3 / _best(lambda: a @ b, tries, device)


def _busy(device: str, first: tuple[float, float], second: tuple[float, float]) -> str | None:
    """Why a measurement cannot be trusted as the machine's peak, or None: other work on the CPUs
    (load average), or two back-to-back measurements that disagree."""
    import os

    if device == "cpu" and hasattr(os, "getloadavg"):
        cpus = physical_cpus()
        load = os.getloadavg()[0]
        if load > cpus + 0.5:  # this process accounts for about one
            return f"load average {load:.1f} on {cpus} CPUs: other work was running"
    for name, x, y in (("bandwidth", first[0], second[0]), ("GEMM", first[1], second[1])):
        if abs(x - y) / max(x, y) > BUSY_SPREAD:
            return f"two {name} measurements disagreed by {abs(x - y) / max(x, y):.0%}: the machine was busy"
    return None


def measure_peaks(device: str, dtype: str) -> dict[str, Any]:
    """Read and copy bandwidth and GEMM FLOP/s, each the best of several tries, measured twice; when
    the two disagree or the load average says other work runs, the result is marked `suspect`."""
    import datetime

    tries = 5 if device == "cpu" else 10
    runs = []  # (read, copy, gemm) per measurement
    for _ in range(2):
        runs.append((*_bandwidth(device, tries), _gemm(device, dtype, 4 if device == "cpu" else 10)))
    read, copy, flops = (max(col) for col in zip(*runs))
    nbytes, n = SIZES[device]
    out = {"bandwidth_gb_s": max(read, copy) / 1e9, "read_bandwidth_gb_s": read / 1e9, "copy_bandwidth_gb_s": copy / 1e9,
           "matmul_tflops": flops / 1e12, "dtype": dtype, "device": device,
           "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": f"streaming sum and copy of {nbytes >> 20} MiB, {n}² GEMM at {dtype}; best of {tries} tries, measured twice"}
    why = _busy(device, *((max(r[0], r[1]), r[2]) for r in runs))
    if why:
        out["suspect"] = why
    return out


def peaks(device: str, dtype: str, remeasure: bool = False) -> dict[str, Any]:
    """Measured once per (machine, device, dtype, threads) and cached under the slimctl cache; a
    measurement taken while the machine was busy is used for this run but never cached.
    `remeasure` measures again (and caches the result when it is trustworthy)."""
    path = cache_dir() / "roofline.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = _key(device, dtype)
    if remeasure or key not in cache:
        fresh = measure_peaks(device, dtype)
        if "suspect" in fresh:
            return {**fresh, "cached_in": None}
        cache[key] = fresh
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=2))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement
    return {**cache[key], "cached_in": str(path)}


def cached_peaks(device: str, dtype: str) -> dict[str, Any] | None:
    """The cached peaks of this machine, or None when they were never measured here (nothing is measured)."""
    try:
        return json.loads((cache_dir() / "roofline.json").read_text()).get(_key(device, dtype))
    except (OSError, ValueError):
        return None


def checked_fractions(model, kind: str, result: BenchResult, device: str, dtype: str,
                      remeasure: bool = False) -> dict[str, Any]:
    """`fractions` against the cached peaks; a fraction above 100 % means the peak is wrong (a run cannot
    beat a physical limit), so the peaks are measured again once. A fraction still above 100 % is kept
    but marked `suspect`, with the reason, and no renderer shows it without that mark."""
    pk = peaks(device, dtype, remeasure)
    res = fractions(model, kind, result, pk)
    if _over(res) and not remeasure:
        try:
            pk = peaks(device, dtype, remeasure=True)
            res = {**fractions(model, kind, result, pk), "peaks_remeasured": True}
        except (MemoryError, RuntimeError):  # under a memory cap (bench --max-memory) there may be no room
            pass
    if _over(res):
        pct = max(floor_percentages(res))
        res["suspect"] = (f"a phase ran at {pct:.0f}% of its floor: the measured peak is below what this run achieved "
                          + (f"({pk['suspect']})" if pk.get("suspect") else "(re-measure alone on the machine: --remeasure-peaks)"))
    elif pk.get("suspect"):
        res["suspect"] = f"peaks measured on a busy machine: {pk['suspect']}"
    return res


def _over(res: dict[str, Any]) -> bool:
    return any(p > 100 for p in floor_percentages(res))


def _kv_bytes_per_token(config, elem: int) -> int:
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0) or 1
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    return 2 * layers * kv * head_dim * elem


def _matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: all but the input embedding table (a lookup)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    if out is not None and id(out.weight) in skip:  # tied LM head: a real matmul
        n += out.weight.numel()
    return n


def fractions(model, kind: str, result: BenchResult, pk: dict[str, Any]) -> dict[str, Any]:
    """% of the roofline floor a bench result reaches: floor time / measured time."""
    cfg = getattr(model, "config", None)
    if cfg is None or not any(True for _ in model.parameters()):
        return {"note": "no roofline for this backend (weights are not torch tensors)"}
    b, l = result.batch_size, result.seq_len
    bw, peak = pk["bandwidth_gb_s"] * 1e9, pk["matmul_tflops"] * 1e12
    weights = state_bytes(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = state_bytes(emb) if emb is not None else 0
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and emb is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    read_per_step = weights - (0 if tied else table)  # the embedding table is gathered, not streamed
    params = _matmul_params(model)
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    res: dict[str, Any] = {"bandwidth_gb_s": round(pk["bandwidth_gb_s"], 2), "matmul_tflops": round(pk["matmul_tflops"], 3),
                           "peaks_dtype": pk["dtype"], "peaks_measured_at": pk.get("measured_at")}
    if kind == CAUSAL_LM and "decode_step" in result.phases:
        elem = next(model.parameters()).element_size()
        ctx = l + (result.decode_tokens or 0) / 2  # mean context over the decode
        kv = _kv_bytes_per_token(cfg, elem) * ctx * b
        floor = (read_per_step + kv) / bw
        step_s = result.phases["decode_step"].latency_ms.p50 / 1000
        res.update(decode_bytes_per_step=int(read_per_step + kv), decode_floor_ms=floor * 1000,
                   decode_pct_of_bandwidth_floor=100 * floor / step_s)
        pre = result.phases["prefill"].latency_ms.p50 / 1000
    else:
        pre = result.latency_ms.p50 / 1000
    flops = 2 * params * b * l + 4 * layers * b * l * l * hidden  # weights + attention scores and mixing
    ph = "prefill" if kind == CAUSAL_LM else "forward"
    res.update({f"{ph}_flops": flops, f"{ph}_floor_ms": flops / peak * 1000, f"{ph}_pct_of_compute_floor": 100 * flops / peak / pre})
    return res
