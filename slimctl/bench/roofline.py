"""Roofline: the device's measured memory bandwidth (a large copy) and matmul peak (a large GEMM at
the dtype), cached per machine, and how close a bench result comes to the floors they set: decode
against the bytes it must read per step, prefill against the FLOPs it must do."""
from __future__ import annotations

import json
import time
from typing import Any

import torch

from ..models import CAUSAL_LM, cache_dir, state_bytes
from .measure import cpu_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _key(device: str, dtype: str) -> str:
    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_name()
    return f"{device}|{name}|{dtype}|threads={torch.get_num_threads()}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_peaks(device: str, dtype: str) -> dict[str, Any]:
    """Best of several tries: copy bandwidth (read + write bytes / s) and GEMM FLOP/s."""
    dt = DTYPES.get(dtype, torch.float32)
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    bw = 0.0
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        bw = max(bw, 2 * nbytes / (time.perf_counter() - t))
    del src, dst
    n = 8192 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    a @ b  # warm-up
    flops = 0.0
    for _ in range(4 if device == "cpu" else 10):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        flops = max(flops, 2 * n ** 3 / (time.perf_counter() - t))
    return {"bandwidth_gb_s": bw / 1e9, "matmul_tflops": flops / 1e12, "dtype": dtype, "device": device,
            "method": f"copy of {nbytes >> 20} MiB; {n}x{n} GEMM at {dtype}; best of several"}


def peaks(device: str, dtype: str) -> dict[str, Any]:
    """Measured once per (machine, device, dtype, threads) and cached under the slimctl cache."""
    path = cache_dir() / "roofline.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = _key(device, dtype)
    if key not in cache:
        cache[key] = measure_peaks(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=2))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement
    return {**cache[key], "cached_in": str(path)}


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


def fractions(model, kind: str, result: dict[str, Any], pk: dict[str, Any]) -> dict[str, Any]:
    """% of the roofline floor a bench result reaches: floor time / measured time."""
    cfg = getattr(model, "config", None)
    if cfg is None or not any(True for _ in model.parameters()):
        return {"note": "no roofline for this backend (weights are not torch tensors)"}
    b, l = result["batch_size"], result["seq_len"]
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
                           "peaks_dtype": pk["dtype"]}
    if kind == CAUSAL_LM and "decode_step" in result.get("phases", {}):
        elem = next(model.parameters()).element_size()
        ctx = l + result.get("decode_tokens", 0) / 2  # mean context over the decode
        kv = _kv_bytes_per_token(cfg, elem) * ctx * b
        floor = (read_per_step + kv) / bw
        step_s = result["phases"]["decode_step"]["latency_ms"]["p50"] / 1000
        res.update(decode_bytes_per_step=int(read_per_step + kv), decode_floor_ms=floor * 1000,
                   decode_pct_of_bandwidth_floor=100 * floor / step_s)
        pre = result["phases"]["prefill"]["latency_ms"]["p50"] / 1000
    else:
        pre = result["latency_ms"]["p50"] / 1000
    flops = 2 * params * b * l + 4 * layers * b * l * l * hidden  # weights + attention scores and mixing
    ph = "prefill" if kind == CAUSAL_LM else "forward"
    res.update({f"{ph}_flops": flops, f"{ph}_floor_ms": flops / peak * 1000, f"{ph}_pct_of_compute_floor": 100 * flops / peak / pre})
    return res
