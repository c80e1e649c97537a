#!/usr/bin/env python
"""The quantized KV cache on smollm2-135m: perplexity cost over 2,048-token windows (held-out BBC, each
quantized cache against the same model's fp cache), KV bytes per token, and peak memory and decode speed with
an 8,192-token context, for slimctl's torch path (fp32 / int8 / int4) and llama.cpp (f16 / q8_0 / q4_0 on an
f32 GGUF export). Writes bench-results/kvcache.json. Run it alone: memory and timings share the machine.

Usage: .venv/bin/python scripts/bench_kvcache.py [--out bench-results/kvcache.json] [--context 8192]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
KINDS = {"torch": ("fp", "int8", "int4"), "llama.cpp": ("f16", "q8_0", "q4_0")}
DECODE = 16


def slimctl(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "slimctl", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout)


def perplexity(model: str, kind: str, seq_len: int) -> dict:
    if kind in ("fp", "f16"):
        return {}
    ev = slimctl("eval", model, "--kv-cache", kind, "--seq-len", str(seq_len))
    if "error" in ev:
        return ev
    return {"perplexity": ev["metrics"]["perplexity"], "fp_cache_perplexity": ev["reference_metrics"]["perplexity"],
            "perplexity_ratio": ev["vs_reference"]["perplexity_ratio"], "kl_divergence": ev["vs_reference"]["kl_divergence"],
            "top1_agreement": ev["vs_reference"]["top1_agreement"], "tokens_scored": ev["settings"]["tokens_scored"]}


def long_context(model: str, kind: str, context: int) -> dict:
    b = slimctl("bench", model, "--kv-cache", kind, "--seq-len", str(context - DECODE), "--decode-tokens", str(DECODE),
                "--min-iters", "1", "--min-seconds", "0", "--repeats", "1")
    if "error" in b:
        return b
    r = b["bench"]
    keep = ("kv_cache", "kv_bytes_per_token", "kv_bytes_measured", "kv_cache_mb", "peak_memory_mb", "rss_before_mb",
            "decode_tokens_per_s", "prefill_ms", "weights_in_memory_mb")
    return {k: r.get(k) for k in keep if r.get(k) is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/kvcache.json")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048, help="perplexity window")
    ap.add_argument("--keep-eval", help="reuse the perplexity rows of an earlier run of this script (its JSON)")
    args = ap.parse_args()
    kept = {(r["runtime"], r["kv_cache"]): r["eval"] for r in json.loads(Path(args.keep_eval).read_text())["results"]
            if "eval" in r} if args.keep_eval else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        gguf = Path(tmpd) / "smol-f32.gguf"
        exp = slimctl("export", MODEL, "--float-type", "f32", "--embeddings", "f32", "--out", str(gguf))
        for runtime, kinds in KINDS.items():
            model = MODEL if runtime == "torch" else str(gguf)
            if runtime == "llama.cpp" and "error" in exp:
                rows.append({"runtime": runtime, "error": exp["error"]})
                continue
            for kind in kinds:
                print(f"[kv] {runtime} {kind}", file=sys.stderr, flush=True)
                ev = kept.get((runtime, kind)) or perplexity(model, kind, args.seq_len)
                rows.append({"runtime": runtime, "kv_cache": kind, "eval": ev,
                             "context": args.context, "bench": long_context(model, kind, args.context)})
                _write(Path(args.out), args, rows)
    _write(Path(args.out), args, rows)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _write(out: Path, args, rows: list) -> None:
    import platform

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    doc = {"machine": {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__},
           "model": MODEL, "eval": f"held-out BBC, {args.seq_len}-token windows, each cache against the same model's fp cache",
           "bench": f"batch 1, prefill {args.context - DECODE} + {DECODE} decode tokens ({args.context} in the cache)",
           "results": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
