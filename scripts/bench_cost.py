#!/usr/bin/env python
"""The cost of slimming itself: how long each calibrated recipe takes on this machine, where the time goes
(calibration forwards, input statistics, Hessian factorisation, solves, searches, sensitivity passes) with
each stage's FLOPs as a share of the CPU's measured fp32 matmul peak, and the result's perplexity ratio on
held-out BBC and 400 tweets, so that a faster version can be checked against the same results.

Usage: .venv/bin/python scripts/bench_cost.py [--recipes int4-gptq-g64 ...] [--label after]
           [--code /path/to/another/checkout] [--out bench-results/cost.json]

Each recipe runs in a fresh process (load smollm2-135m, apply the recipe's steps, evaluate); rows are kept
per (recipe, label), so `--code` pointed at an older checkout with `--label before` puts the old timings
beside the new ones in one file. `digest` hashes every tensor of the slimmed model: equal digests mean
bit-identical artifacts. Run it alone: timings share the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["int4-gptq-g64", "int4-awq-gptq-g32", "mixed-4.5bit"]


def child(recipe: str, model: str, tweets: str | None) -> dict:
    """One recipe applied and evaluated in this process (run by the parent as a fresh process)."""
    import hashlib
    import time

    import torch

    from slimctl.evaluate import evaluate
    from slimctl.machine import RssSampler
    from slimctl.models import load
    from slimctl.specs import EvalSpec
    from slimctl.steps import UI, apply_steps

    m = load(model)
    steps, seconds = [], 0.0
    if recipe != "fp32":
        from slimctl.recipe import load as load_recipe

        t0 = time.perf_counter()
        with RssSampler() as rss:
            path = Path(recipe) if recipe.endswith(".yaml") else REPO / "recipes" / f"{recipe}.yaml"
            model_, steps, _ = apply_steps(m.model, m.tokenizer, load_recipe(path), m.kind, UI())
        seconds = time.perf_counter() - t0
    else:
        model_, rss = m.model, None
    digest = hashlib.sha256()
    for k, v in sorted(model_.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    ppl = {"bbc": evaluate(model_, m.tokenizer, m.kind, EvalSpec()).metrics["perplexity"]}
    if tweets:
        ppl["tweets"] = evaluate(model_, m.tokenizer, m.kind, EvalSpec(data=tweets)).metrics["perplexity"]
    return {"recipe": recipe, "seconds": round(seconds, 1), "peak_rss_mb": round(rss.peak_rss_mb, 1) if rss else None,
            "steps": [s.model_dump(mode="json", include={"method", "seconds", "time_breakdown", "bits_per_weight", "sensitivity_method",
                                                          "allocation_counts", "sensitivity"}, exclude_unset=True) for s in steps],
            "perplexity": ppl, "digest": digest.hexdigest()[:16]}


def _run_child(recipe: str, model: str, tweets: Path | None, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", recipe, "--models", model]
    cmd += ["--tweets", str(tweets)] if tweets else []
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
    if r.returncode != 0:
        return {"recipe": recipe, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _with_peak(row: dict, peak_gflops: float | None) -> dict:
    for s in row.get("steps", []):
        for st in s.get("time_breakdown") or []:
            if peak_gflops and st.get("gflops_per_s"):
                st["pct_of_matmul_peak"] = round(100 * st["gflops_per_s"] / peak_gflops, 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--label", default="current")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose slimctl runs the recipes")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "cost.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tweets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.models, args.tweets)))
        return 0
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_recipes import ood_file
    from slimctl.bench.roofline import peaks
    from slimctl.machine import cpu_name

    import torch
    import transformers

    pk = peaks("cpu", "float32")
    peak_gflops = None if pk.get("suspect") else pk["matmul_tflops"] * 1e3
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
    doc["environment"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "model": args.models,
                          "matmul_peak_gflops_fp32": round(peak_gflops, 1) if peak_gflops else None,
                          "peak_note": pk.get("suspect") or pk.get("method")}
    with tempfile.TemporaryDirectory() as tmp:
        tweets = ood_file(Path(tmp))
        for recipe in ["fp32", *args.recipes]:
            print(f"{args.label}: {recipe}", file=sys.stderr, flush=True)
            row = {**_with_peak(_run_child(recipe, args.models, tweets, args.code.resolve()), peak_gflops),
                   "label": args.label}
            doc["results"] = [r for r in doc["results"] if (r["recipe"], r.get("label")) != (recipe, args.label)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
            print(json.dumps({k: row.get(k) for k in ("recipe", "seconds", "perplexity", "digest", "error")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
