#!/usr/bin/env python
"""Structured pruning + int4 against the same int4 recipe without pruning, speed measured head to head.

Both recipes are run on one model (`slimctl run --skip-bench`: BBC held-out perplexity against fp32 in
the same run), scored on 400 tweets out of domain, then the two int4 artifacts are benchmarked against
each other in alternating fresh-process rounds (slimctl.bench.pair_isolated, the recipe's bench spec,
fused int4 kernels as `slimctl bench` picks them). Writes bench-results/prune-int4.json. Run it alone.

Usage: .venv/bin/python scripts/bench_prune_int4.py [--model smollm2-135m] [--rounds 5]
           [--pruned recipes/prune-15-global-gptq-g32.yaml] [--plain recipes/int4-gptq-g32.yaml] [--work DIR]
`--work DIR` keeps both artifacts and their rows there; a second call with the same DIR reuses them
(e.g. more rounds, or after an interruption) instead of running the recipes again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, ood_eval, ood_file  # noqa: E402

sys.path.insert(0, str(REPO))


def _run(recipe: str, model: str, dest: Path, tweets: Path | None) -> dict:
    done = dest / "row.json"
    if done.exists():
        print(f"[bench] {Path(recipe).stem}: reusing {dest}", file=sys.stderr, flush=True)
        return json.loads(done.read_text())
    print(f"[bench] {Path(recipe).stem}", file=sys.stderr, flush=True)
    p = subprocess.run([sys.executable, "-m", "slimctl", "run", recipe, "--model", model, "--out", str(dest),
                        "--skip-bench", "--json"], capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise SystemExit(f"{recipe}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    rep = json.loads(p.stdout)
    steps = rep["slimmed"]["steps"]
    row = {"recipe": Path(recipe).stem, "bbc_perplexity_ratio": rep["delta"]["perplexity_ratio"],
           "size_ratio": rep["delta"].get("size_ratio"), "step_seconds": sum(s["seconds"] for s in steps),
           "params_removed_fraction": next((s["params_removed_fraction"] for s in steps if "params_removed_fraction" in s), 0.0),
           "environment": rep["environment"]}
    ev = ood_eval(dest / "model", model, tweets) if tweets else None
    if ev is not None:
        row["tweets_perplexity_ratio"], row["tweets_tokens"] = ev
    done.write_text(json.dumps(row))
    return row


def _speed(side: dict) -> dict:
    return {"decode_tokens_per_s": side.get("decode_tokens_per_s"), "rounds_decode_tokens_per_s": side.get("rounds_decode_tokens_per_s"),
            "prefill_p50_ms": (side.get("prefill_ms") or {}).get("p50"),
            "latency_p50_ms": side["latency_ms"]["p50"], "rounds_p50_ms": side.get("rounds_p50_ms"),
            "decode_mode": side.get("decode_mode"), "kernels": side.get("kernels")}


def _paired(plain: list | None, pruned: list | None) -> dict:
    """Round i of each side ran back to back: the ratio per pair, and how many pairs favour the pruned side."""
    if not plain or not pruned:
        return {}
    r = sorted(b / a for a, b in zip(plain, pruned))
    return {"decode_speedup_per_round": r, "decode_speedup_median": statistics.median(r),
            "rounds_pruned_faster": sum(x > 1 for x in r), "rounds": len(r)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruned", default=str(REPO / "recipes" / "prune-15-global-gptq-g32.yaml"))
    ap.add_argument("--plain", default=str(REPO / "recipes" / "int4-gptq-g32.yaml"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-results/prune-int4.json")
    ap.add_argument("--work", help="keep the artifacts here and reuse them on the next call (default: a temporary folder)")
    args = ap.parse_args()
    from slimctl import recipe as R
    from slimctl.bench import pair_isolated

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(args.work or tmpd)
        tmp.mkdir(parents=True, exist_ok=True)
        tweets = ood_file(tmp)
        plain, pruned = (_run(r, args.model, tmp / n, tweets) for r, n in ((args.plain, "plain"), (args.pruned, "pruned")))
        spec = R.load(Path(args.pruned)).bench
        print(f"[bench] {args.rounds} alternating rounds: plain int4 vs pruned + int4", file=sys.stderr, flush=True)
        a, b = pair_isolated(str(tmp / "plain" / "model"), str(tmp / "pruned" / "model"), spec, args.rounds,
                             say=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    a, b = (x.model_dump(mode="json") for x in (a, b))
    plain["speed"], pruned["speed"] = _speed(a), _speed(b)
    doc = {"model": args.model, "measured": time.strftime("%Y-%m-%d"), "environment": plain.pop("environment"),
           "plain": plain, "pruned": {k: v for k, v in pruned.items() if k != "environment"},
           "pruned_vs_plain": {
               "decode_speedup": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
               **_paired(a.get("rounds_decode_tokens_per_s"), b.get("rounds_decode_tokens_per_s")),
               "request_speedup": a["latency_ms"]["p50"] / b["latency_ms"]["p50"],
               "bbc_perplexity_ratio": pruned["bbc_perplexity_ratio"] / plain["bbc_perplexity_ratio"],
               **({"tweets_perplexity_ratio": pruned["tweets_perplexity_ratio"] / plain["tweets_perplexity_ratio"]}
                  if "tweets_perplexity_ratio" in plain and "tweets_perplexity_ratio" in pruned else {})}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["pruned_vs_plain"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
