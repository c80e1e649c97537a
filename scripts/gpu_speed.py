#!/usr/bin/env python
"""GPU check of slimctl's fast paths (issue: slimmed must mean faster) on a random-initialised
Llama-style model (1.2 B parameters by default): bf16, int4 weight-only (tinygemm), int8 weight-only
and FP8, each decoded eager and compiled (static KV cache + torch.compile "reduce-overhead", i.e.
CUDA graphs), with decode tok/s and % of the bandwidth floor; plus an M=1 matmul comparison of
torch's CUDA int8 weight-only kernel against dequantize + bf16 matmul. Writes one JSON document,
part by part.

Usage: python scripts/gpu_speed.py --out speed.json [--arch llama-1b] [--device cuda] [--only bf16 int4 ...]
On a CPU (`--device cpu --arch tiny --quick`) it runs the same code as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import build, fp8, weight_only  # noqa: E402
from slimctl.bench import bench_model  # noqa: E402
from slimctl.quant.kernels import accelerate  # noqa: E402
from slimctl.recipe import BenchSpec  # noqa: E402

VARIANTS = {"bf16": None, "int4-g128": lambda m: weight_only(m, 4, 128), "int8-channel": lambda m: _int8_channel(m), "fp8": fp8}


def _int8_channel(model):
    from slimctl.quant.layers import WeightOnlyLinear
    from slimctl.stream.skeleton import set_submodule
    from slimctl.quant.integer import QScheme, rtn
    from slimctl.techniques import select_linears

    for name, lin in select_linears(model, []):
        k = lin.in_features
        codes, scale, zero = rtn(lin.weight.detach().float(), QScheme(8, k, True), k)
        set_submodule(model, name, WeightOnlyLinear.from_codes(lin, codes, scale, zero, 8, k))
    return model


def _brief(r: dict) -> dict:
    rf = r.get("roofline") or {}
    return {"decode_tokens_per_s": r["decode_tokens_per_s"], "request_p50_ms": r["latency_ms"]["p50"],
            "prefill_p50_ms": r["prefill_ms"]["p50"], "decode_pct_of_bandwidth_floor": rf.get("decode_pct_of_bandwidth_floor"),
            "compile_seconds": r.get("compile_seconds"), "dtype": r.get("dtype")}


def int8_matmul(device: str) -> list[dict]:
    """M=1 (decode) and M=16: torch._weight_int8pack_mm vs dequantize + bf16 F.linear vs bf16 F.linear."""
    rows = []
    for k, n in ((2048, 2048), (2048, 8192), (8192, 2048)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        s = torch.rand(n, device=device, dtype=torch.bfloat16) / 100
        wb = (w.float() * s.float()[:, None]).to(torch.bfloat16)
        for m in (1, 16):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            fns = {"int8pack": lambda: torch._weight_int8pack_mm(x, w, s),
                   "dequant_bf16": lambda: torch.nn.functional.linear(x, (w.to(torch.bfloat16) * s[:, None])),
                   "bf16": lambda: torch.nn.functional.linear(x, wb)}
            row = {"m": m, "k": k, "n": n}
            for name, f in fns.items():
                try:
                    for _ in range(10):
                        f()
                    torch.cuda.synchronize() if device == "cuda" else None
                    t = time.perf_counter()
                    for _ in range(100):
                        f()
                    torch.cuda.synchronize() if device == "cuda" else None
                    row[f"{name}_us"] = (time.perf_counter() - t) / 100 * 1e6
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", help=f"variants: {' '.join(VARIANTS)} int8-matmul")
    a = ap.parse_args()
    dev = a.device
    spec = BenchSpec(device=dev, batch_size=1, seq_len=128, decode_tokens=8 if a.quick else 32, min_iters=2 if a.quick else 5,
                     min_seconds=0 if a.quick else 1, roofline=True, warmup=1, compile=True)
    out = Path(a.out)
    doc = {"arch": a.arch, "device": dev, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
           "torch": torch.__version__, "results": {}, "errors": {}}
    if not a.only or "int8-matmul" in a.only:
        try:
            doc["int8_matmul"] = int8_matmul(dev)
        except Exception as e:  # noqa: BLE001
            doc["errors"]["int8-matmul"] = f"{type(e).__name__}: {e}"
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for name, change in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            model = build(a.arch, torch.bfloat16, dev)
            if change is not None:
                model = change(model)
            plan = accelerate(model, dev).to_dict() if change is not None else None
            r = bench_model(model, None, "causal-lm", spec).to_json()
            doc["results"][name] = {mode: _brief(x) for mode, x in (r.get("modes") or {"eager": r}).items()}
            doc["results"][name]["kernels"] = {k: plan[k] for k in ("act_dtype", "kernels", "dequantize_layers")} if plan else None
            del model
        except Exception as e:  # noqa: BLE001  one variant failing must not lose the others' numbers
            doc["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        finally:
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_speed] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        _ratios(doc)
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def _ratios(doc: dict) -> None:
    b = doc["results"].get("bf16") or {}
    for name, r in doc["results"].items():
        for mode in ("eager", "compiled"):
            if mode in r and r[mode].get("decode_tokens_per_s"):
                for bm in ("eager", "compiled"):
                    if bm in b:
                        r[mode][f"decode_vs_bf16_{bm}"] = r[mode]["decode_tokens_per_s"] / b[bm]["decode_tokens_per_s"]


if __name__ == "__main__":
    sys.exit(main())
