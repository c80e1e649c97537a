#!/usr/bin/env python
"""GGUF for llama.cpp, measured in one run: smollm2-135m as llama.cpp's own Q4_0 (quantized by
llama_model_quantize from an f32 GGUF that slimctl exports) next to slimctl's RTN and GPTQ int4
exported as Q4_0 from their codes, all run by llama.cpp on the same token stream and windows, with
torch fp32 eager as the 1.00x reference. Writes bench-results/gguf.json and prints a Markdown table.

Run it alone on the machine: `.venv/bin/python scripts/bench_gguf.py [--keep DIR] [--rounds 2]`; with
--keep, files an earlier run left there are reused (their quantization time is then not reported).
Speed is decode tokens/s at batch 1 (128-token prompt, 32 greedy tokens), the median of alternating
fresh-process rounds over all rows; accuracy is held-out BBC perplexity (slimctl's default eval)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIMCTL = [sys.executable, "-m", "slimctl"]


def sh(*args) -> None:
    p = subprocess.run([*SLIMCTL, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if p.returncode not in (0, 1):  # 1: a gate; none are set here
        raise SystemExit(f"slimctl {' '.join(map(str, args[:3]))} failed: {p.stderr[-800:]}")


def perplexity(model, tokenizer) -> dict:
    from slimctl.evaluate import evaluate
    from slimctl.specs import EvalSpec

    ev = evaluate(model, tokenizer, "causal-lm", EvalSpec(), seed=0)
    return {"perplexity": ev.metrics["perplexity"], "tokens_scored": ev.settings["tokens_scored"]}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (what the row really is)."""
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def requantized_share(artifact: Path) -> float:
    """The share of a GPTQ artifact's weights that llama.cpp's Q4_0 rounding of its dequantized values
    would change: what packing the codes instead of re-quantizing preserves."""
    import gguf
    import torch

    from slimctl.models import load
    from slimctl.quant.layers import WeightOnlyLinear

    changed = total = 0
    for mod in load(str(artifact)).model.modules():
        if isinstance(mod, WeightOnlyLinear):
            w = mod.dequantized(torch.float32).numpy()
            again = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0),
                                           gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
            changed += int((again != w).sum())
            total += w.size
    return changed / total


def options(rounds: int, prefix: str) -> tuple[argparse.Namespace, Path]:
    """--keep and --rounds parsed, and the folder to work in (--keep, or a new temporary one)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=Path, help="keep the artifacts and GGUF files here")
    ap.add_argument("--rounds", type=int, default=rounds)
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return a, work


def main() -> None:
    a, work = options(2, "slimctl-gguf-")
    import torch

    from slimctl.bench import bench_isolated
    from slimctl.formats.llamacpp import LlamaCppModel, quantize
    from slimctl.machine import cpu_name
    from slimctl.models import load, resolve
    from slimctl.specs import BenchSpec

    t0 = time.time()
    rows: dict[str, dict] = {}
    # 1. the files: llama.cpp's own Q4_0 from an f32 export; slimctl's int4 exported from its codes
    if not (work / "llamacpp-q4_0.gguf").exists():
        sh("export", "smollm2-135m", "--float-type", "f32", "--embeddings", "f32", "--out", work / "f32.gguf", "--overwrite")
        quantize(work / "f32.gguf", work / "llamacpp-q4_0.gguf", "q4_0")
    files = {"llama.cpp Q4_0 (llama_model_quantize of the f32 GGUF)": work / "llamacpp-q4_0.gguf"}
    for name, method, group in (("slimctl RTN g32 -> Q4_0", "rtn", 32), ("slimctl GPTQ g32 -> Q4_0", "gptq", 32),
                                ("slimctl GPTQ g64 -> Q4_0", "gptq", 64)):
        out = work / f"{method}-g{group}"
        started = time.time()
        if (out / "model.gguf").exists() and a.keep:  # made by an earlier run into --keep: reuse (no step time)
            files[name], rows[name] = out / "model.gguf", {"step_seconds": None}
            continue
        sh("quantize", "smollm2-135m", "--method", method, "--bits", "4", "--group-size", group, "--set", "fp16_scales=true",
           *(["--set", "act_order=true"] if method == "gptq" else []), "--skip-eval", "--skip-bench", "--out", out, "--overwrite")
        step_s = time.time() - started
        sh("export", out / "model", "--out", out / "model.gguf", "--overwrite")
        files[name] = out / "model.gguf"
        rows[name] = {"step_seconds": round(step_s, 1)}
    rows["slimctl GPTQ g32 -> Q4_0"]["codes_changed_by_requantizing"] = requantized_share(work / "gptq-g32" / "model")
    # 2. accuracy: the fp32 model in torch, every GGUF in llama.cpp, on one token stream (the HF tokenizer's)
    base = load("smollm2-135m")
    ref = perplexity(base.model, base.tokenizer)
    rows["torch fp32 eager"] = {**ref, "file_mb": sum(p.stat().st_size for p in resolve("smollm2-135m")[0].glob("*.safetensors")) / 2**20}
    for name, path in files.items():
        m = LlamaCppModel(path, base.model.config)
        rows.setdefault(name, {}).update(perplexity(m, base.tokenizer), file_mb=path.stat().st_size / 2**20,
                                         tensor_types=tensor_types(path))
        del m
    del base
    # 3. speed: alternating fresh-process rounds over every row
    spec = BenchSpec(batch_size=1, seq_len=128, decode_tokens=32, min_iters=5, min_seconds=3, repeats=1)
    targets = {"torch fp32 eager": str(resolve("smollm2-135m")[0]), **{n: str(p) for n, p in files.items()}}
    for r in range(a.rounds):
        for name, target in targets.items():
            res = bench_isolated(target, spec).to_json()
            rows[name].setdefault("decode_tok_s_rounds", []).append(res["decode_tokens_per_s"])
            rows[name].setdefault("prefill_ms_rounds", []).append(res["prefill_ms"]["p50"])
            print(f"round {r + 1}: {name}: decode {res['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    for row in rows.values():
        row["decode_tok_s"] = statistics.median(row["decode_tok_s_rounds"])
        row["prefill_ms"] = statistics.median(row["prefill_ms_rounds"])
    fp32 = rows["torch fp32 eager"]
    for row in rows.values():
        row["ppl_ratio"] = row["perplexity"] / fp32["perplexity"]
        row["decode_vs_fp32"] = row["decode_tok_s"] / fp32["decode_tok_s"]
    doc = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "python": platform.python_version(),
           "torch": torch.__version__, "llama_cpp_python": __import__("llama_cpp").__version__,
           "eval": "held-out BBC News, slimctl's default stream (16,384 tokens max, windows of 512)",
           "bench": "batch 1, 128-token prompt, 32 greedy tokens; median of alternating fresh-process rounds",
           "imatrix": "not measured: llama-cpp-python's llama_model_quantize takes no importance matrix from Python",
           "seconds": round(time.time() - t0), "rows": rows}
    out = REPO / "bench-results" / "gguf.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| row | ppl ratio vs torch fp32 | decode tok/s | vs fp32 | prefill p50 ms | file MB |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | ×{r['ppl_ratio']:.4f} | {r['decode_tok_s']:.1f} | {r['decode_vs_fp32']:.2f}× | {r['prefill_ms']:.0f} | "
              f"{r['file_mb']:.1f} |")
    print(f"\nwrote {out} ({doc['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
