#!/usr/bin/env python
"""GPU check of slimctl's formats on a random-initialised Llama-style model (1.2 B parameters by
default): bf16 and fp16, int8 and int4 weight-only (slimctl), NF4 (bitsandbytes, when installed)
and FP8 (compute capability >= 8.9), each with decode/prefill speed, peak memory, the roofline
fraction, and a batch sweep for bf16. Writes one JSON document.

Usage: python scripts/gpu_bench.py --out gpu.json [--arch llama-1b] [--device cuda] [--quick]
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
from slimctl.bench import bench_model  # noqa: E402
from slimctl.bench.catalogue import ARCHITECTURES  # noqa: E402
from slimctl.bench.sweep import recommend, sweep  # noqa: E402
from slimctl.recipe import BenchSpec  # noqa: E402

TINY = dict(ARCHITECTURES["llama-1b"], hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=2048)


def build(arch: str, dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in (TINY if arch == "tiny" else ARCHITECTURES[arch]).items()
                         if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


def weight_only(model, bits: int, group: int):
    from slimctl.quant.layers import WeightOnlyLinear
    from slimctl.stream.skeleton import set_submodule
    from slimctl.quant.integer import QScheme, rtn
    from slimctl.techniques import select_linears

    for name, lin in select_linears(model, []):
        codes, scale, zero = rtn(lin.weight.detach().float(), QScheme(bits, group, True), group)
        set_submodule(model, name, WeightOnlyLinear.from_codes(lin, codes, scale, zero, bits, group))
    return model


def fp8(model):
    from slimctl.quant.fp8 import Fp8Linear
    from slimctl.stream.skeleton import set_submodule
    from slimctl.techniques import select_linears

    for name, lin in select_linears(model, []):
        set_submodule(model, name, Fp8Linear.from_linear(lin))
    return model


def nf4(model):
    import bitsandbytes as bnb

    from slimctl.stream.skeleton import set_submodule
    from slimctl.techniques import select_linears

    for name, lin in select_linears(model, []):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.detach().to("cpu", torch.float16), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        set_submodule(model, name, q.to(lin.weight.device))
    return model


def sparse24(device: str, quick: bool) -> list[dict]:
    """2:4 semi-structured vs dense Linear layers at several shapes (CUDA, bf16): the measured gain."""
    from slimctl.quant.sparsity import nm_mask, to_semi_structured

    shapes = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096), (4096, 14336), (14336, 4096)]
    rows = []
    for tokens in (16, 256, 2048):
        for k, n in shapes[:3] if quick else shapes:
            lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.masked_fill_(nm_mask(lin.weight.abs().float(), 2, 4), 0)
            x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)

            def time_it(m):
                for _ in range(5):
                    m(x)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(50):
                    m(x)
                torch.cuda.synchronize()
                return (time.perf_counter() - t) / 50 * 1000

            dense = time_it(lin)
            model = torch.nn.Sequential(lin)
            to_semi_structured(model)
            sparse = time_it(model)
            rows.append({"tokens": tokens, "in": k, "out": n, "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse,
                         "note": "no gain" if dense / sparse < 1.0 else ""})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama-1b", choices=["tiny", *ARCHITECTURES])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and decode tokens")
    ap.add_argument("--only", nargs="+", help="run only these parts: bf16 fp16 int8-weight-only int4-weight-only-g128 fp8 nf4 sparse24")
    args = ap.parse_args()
    dev = args.device
    spec = BenchSpec(device=dev, batch_size=1, seq_len=128, decode_tokens=16 if args.quick else 32,
                     min_iters=2 if args.quick else 5, min_seconds=0 if args.quick else 1, roofline=True, warmup=1)
    out = Path(args.out)
    doc = {"arch": args.arch, "device": dev, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
           "capability": list(torch.cuda.get_device_capability(0)) if dev == "cuda" else None,
           "torch": torch.__version__, "results": {}, "errors": {}}
    half = torch.bfloat16
    variants = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None), ("int8-weight-only", half, lambda m: weight_only(m, 8, 128)),
                ("int4-weight-only-g128", half, lambda m: weight_only(m, 4, 128)), ("fp8", half, fp8), ("nf4", half, nf4)]
    for name, dtype, change in variants:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            if name == "fp8":
                from slimctl.quant.fp8 import fp8_supported

                ok, why = fp8_supported()
                if not ok and dev == "cuda":
                    doc["errors"][name] = f"refused: {why}"
                    continue
            model = build(args.arch, dtype, dev)
            doc.setdefault("parameters", sum(p.numel() for p in model.parameters()))
            if change is not None:
                model = change(model)
            r = bench_model(model, None, "causal-lm", spec).to_json()
            doc["results"][name] = {k: r.get(k) for k in ("dtype", "decode_tokens_per_s", "prefill_ms", "prefill_tokens_per_s",
                                                         "peak_memory_mb", "weights_in_memory_mb", "roofline", "latency_ms")}
            doc["results"][name]["latency_ms"] = {k: r["latency_ms"][k] for k in ("p50", "p90")}
            if name == "bf16":
                rows = sweep(lambda s: bench_model(model, None, "causal-lm", s), spec.model_copy(update={"roofline": False}),
                             [1, 4, 16] if args.quick else [1, 4, 16, 64], None, None)
                doc["bf16_sweep"] = [row.model_dump(mode="json", exclude_unset=True) for row in rows]
                rec = recommend(rows, None)
                doc["bf16_recommendation"] = rec.model_dump(mode="json") if rec else None
            del model
        except Exception as e:  # noqa: BLE001  one format failing must not lose the others' numbers
            doc["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        finally:
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_bench] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        _write(out, doc)  # part by part: a run stopped at its time limit keeps what it measured
    if dev == "cuda" and (not args.only or "sparse24" in args.only):
        try:
            doc["sparse24_linears"] = sparse24(dev, args.quick)
            from slimctl.quant.sparsity import nm_mask

            model = build(args.arch, torch.bfloat16, dev)
            with torch.no_grad():
                for mod in model.modules():
                    if type(mod) is torch.nn.Linear and mod is not model.get_output_embeddings():
                        mod.weight.masked_fill_(nm_mask(mod.weight.abs().float(), 2, 4), 0)
            dense = bench_model(model, None, "causal-lm", spec).to_json()
            sparse = bench_model(model, None, "causal-lm", spec.model_copy(update={"semi_structured": True, "roofline": False})).to_json()
            doc["sparse24_model"] = {k: {"decode_tokens_per_s": r["decode_tokens_per_s"], "prefill_p50_ms": r["prefill_ms"]["p50"],
                                         "layers": r.get("semi_structured_layers")} for k, r in (("dense", dense), ("2:4", sparse))}
            del model
        except Exception as e:  # noqa: BLE001
            doc["errors"]["sparse24"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
    _write(out, doc)
    return 0


def _write(out: Path, doc: dict) -> None:
    base = doc["results"].get("bf16", {}).get("decode_tokens_per_s")
    for r in doc["results"].values():
        if base and r.get("decode_tokens_per_s"):
            r["decode_vs_bf16"] = r["decode_tokens_per_s"] / base
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
