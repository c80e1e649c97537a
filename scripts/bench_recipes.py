#!/usr/bin/env python
"""Run every shipped recipe on each built-in model and write one JSON of the measured effects.

Usage: .venv/bin/python scripts/bench_recipes.py [--out bench-results/recipes.json] [--models minilm-l6 smollm2-135m]
The README's recipe table is made from this file's output; it names the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("speedup", "decode_speedup", "prefill_speedup", "perplexity_ratio", "fidelity", "top1_agreement",
        "kl_divergence", "mean_cosine", "topic_accuracy_change", "size_ratio", "peak_memory_ratio")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/recipes.json")
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--recipes", nargs="+", default=sorted(str(p) for p in (REPO / "recipes").glob("*.yaml")))
    args = ap.parse_args()
    rows, env = [], None
    for model in args.models:
        for recipe in args.recipes:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "slimctl", "run", recipe, "--model", model, "--out", f"{tmp}/o", "--json"]
                print(f"[bench] {model} {Path(recipe).stem}", file=sys.stderr, flush=True)
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode not in (0, 1):
                    rows.append({"model": model, "recipe": Path(recipe).stem, "error": p.stderr.strip().splitlines()[-1:]})
                    continue
                rep = json.loads(p.stdout)
                env = rep["environment"]
                b, s = rep["baseline"], rep["slimmed"]
                rows.append({
                    "model": model, "recipe": Path(recipe).stem, "passed": rep["passed"],
                    "delta": {k: rep["delta"].get(k) for k in KEYS if rep["delta"].get(k) is not None},
                    "baseline": {"eval": b["eval"]["metrics"], "latency_p50_ms": b["bench"]["latency_ms"]["p50"],
                                 "latency_stdev_ms": b["bench"]["latency_ms"]["stdev"],
                                 "decode_tokens_per_s": b["bench"].get("decode_tokens_per_s"),
                                 "size_mb": b["bench"]["size_mb"], "peak_memory_mb": b["bench"]["peak_memory_mb"]},
                    "slimmed": {"eval": s["eval"]["metrics"], "latency_p50_ms": s["bench"]["latency_ms"]["p50"],
                                "latency_stdev_ms": s["bench"]["latency_ms"]["stdev"],
                                "decode_tokens_per_s": s["bench"].get("decode_tokens_per_s"),
                                "size_mb": s["bench"]["size_mb"], "peak_memory_mb": s["bench"]["peak_memory_mb"]},
                    "warnings": rep.get("warnings", []), "seconds": rep.get("seconds"),
                })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
