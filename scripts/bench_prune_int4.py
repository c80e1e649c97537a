#!/usr/bin/env python
"""Structured pruning + int4 against the same int4 recipe without pruning, speed measured head to head.

Both recipes are run on one model (`slimctl run --skip-bench`: BBC held-out perplexity against fp32 in
the same run), scored on 400 tweets out of domain, then the two int4 artifacts are benchmarked against
each other in alternating fresh-process rounds (slimctl.bench.pair_isolated, the recipe's bench spec,
fused int4 kernels as `slimctl bench` picks them). `--interleave N` adds N fresh processes that decode both
artifacts step for step (slimctl.bench.interleaved): on a shared VM whose speed drifts more between rounds than
pruning changes it, that pairs the two sides milliseconds apart. Writes bench-results/prune-int4.json. Run it alone.

Usage: .venv/bin/python scripts/bench_prune_int4.py [--model smollm2-135m] [--rounds 5]
           [--pruned recipes/prune-15-global-gptq-g32.yaml] [--plain recipes/int4-gptq-g32.yaml] [--work DIR]
           [--compile] [--interleave N]
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
            "decode_step_p50_ms": ((side.get("phases") or {}).get("decode_step") or {}).get("latency_ms", {}).get("p50"),
            "decode_mode": side.get("decode_mode"), "compile_seconds": side.get("compile_seconds"), "kernels": side.get("kernels")}


def _paired(plain: list | None, pruned: list | None) -> dict:
    """Round i of each side ran back to back: the ratio per pair, and how many pairs favour the pruned side."""
    if not plain or not pruned:
        return {}
    r = sorted(b / a for a, b in zip(plain, pruned))
    return {"decode_speedup_per_round": r, "decode_speedup_median": statistics.median(r),
            "rounds_pruned_faster": sum(x > 1 for x in r), "rounds": len(r)}


def _interleaved(plain: Path, pruned: Path, rounds: int, compile: bool, spec) -> dict:
    """`rounds` fresh processes, each decoding both artifacts step for step (slimctl.bench.interleaved), the
    load order swapped every round: the pruned side's speedup per round and their median."""
    from slimctl.bench.interleaved import in_processes

    opts = {"compile": compile, "seq_len": spec.seq_len or 128, "steps": spec.decode_tokens, "threads": spec.threads}
    res = in_processes(plain, pruned, rounds, opts, say=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    for r in res:
        r["pruned_speedup"] = r.pop("b_speedup")
    ups = sorted(r["pruned_speedup"] for r in res)
    return {"decode": "compiled" if compile else "eager", "per_process": res, "pruned_speedup_per_process": ups,
            "pruned_speedup_median": statistics.median(ups), "processes_pruned_faster": sum(u > 1 for u in ups)}


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruned", default=str(REPO / "recipes" / "prune-15-global-gptq-g32.yaml"))
    ap.add_argument("--plain", default=str(REPO / "recipes" / "int4-gptq-g32.yaml"))
    ap.add_argument("--rounds", type=int, default=5, help="alternating fresh-process bench rounds (0: none)")
    ap.add_argument("--interleave", type=int, default=0,
                    help="also this many fresh processes that decode both artifacts step for step (ratios paired "
                         "milliseconds apart: for differences smaller than this machine's round-to-round noise)")
    ap.add_argument("--out", default="bench-results/prune-int4.json")
    ap.add_argument("--work", help="keep the artifacts here and reuse them on the next call (default: a temporary folder)")
    ap.add_argument("--compile", action="store_true",
                    help="decode on a static KV cache under torch.compile (bench compile: true) instead of eager: "
                         "Python overhead leaves the step, so what pruning takes off the weights shows")
    return ap.parse_args()


def _rounds(tmp: Path, spec, rounds: int, plain: dict, pruned: dict) -> dict:
    from slimctl.bench import pair_isolated

    print(f"[bench] {rounds} alternating rounds: plain int4 vs pruned + int4", file=sys.stderr, flush=True)
    a, b = pair_isolated(str(tmp / "plain" / "model"), str(tmp / "pruned" / "model"), spec, rounds,
                         say=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    a, b = (x.model_dump(mode="json") for x in (a, b))
    plain["speed"], pruned["speed"] = _speed(a), _speed(b)
    return {"decode_speedup": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
            **_paired(a.get("rounds_decode_tokens_per_s"), b.get("rounds_decode_tokens_per_s")),
            "request_speedup": a["latency_ms"]["p50"] / b["latency_ms"]["p50"]}


def main() -> int:
    args = _args()
    from slimctl import recipe as R

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(args.work or tmpd)
        tmp.mkdir(parents=True, exist_ok=True)
        tweets = ood_file(tmp)
        plain, pruned = (_run(r, args.model, tmp / n, tweets) for r, n in ((args.plain, "plain"), (args.pruned, "pruned")))
        spec = R.load(Path(args.pruned)).bench
        if args.compile:
            spec = spec.model_copy(update={"compile": True})
        speed = _rounds(tmp, spec, args.rounds, plain, pruned) if args.rounds else {}
        inter = _interleaved(tmp / "plain" / "model", tmp / "pruned" / "model", args.interleave, args.compile, spec) \
            if args.interleave else None
    doc = {"model": args.model, "measured": time.strftime("%Y-%m-%d"), "environment": plain.pop("environment"),
           "decode": "compiled" if args.compile else "eager",
           "plain": plain, "pruned": {k: v for k, v in pruned.items() if k != "environment"},
           "pruned_vs_plain": {
               **speed,
               **({"interleaved_decode_speedup_median": inter["pruned_speedup_median"],
                   "interleaved_decode_speedup_per_process": inter["pruned_speedup_per_process"]} if inter else {}),
               "bbc_perplexity_ratio": pruned["bbc_perplexity_ratio"] / plain["bbc_perplexity_ratio"],
               **({"tweets_perplexity_ratio": pruned["tweets_perplexity_ratio"] / plain["tweets_perplexity_ratio"]}
                  if "tweets_perplexity_ratio" in plain and "tweets_perplexity_ratio" in pruned else {})}}
    if inter:
        doc["interleaved"] = inter
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["pruned_vs_plain"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
