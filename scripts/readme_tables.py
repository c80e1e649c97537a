#!/usr/bin/env python
"""Render the README's result tables (Markdown) from a bench JSON written by bench_recipes.py."""
import json
import sys


def f(v, nd=3, suffix=""):
    return "–" if v is None else f"{v:.{nd}f}{suffix}"


def main(path: str) -> None:
    d = json.load(open(path))
    env = d["environment"]
    print(f"Measured by `{' '.join(sys.argv[1:]) or path}` on {env['cpu']}, {env['threads']} threads, "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}. "
          "Speed: pooled p50 of 3 alternating fresh-process rounds; the range is the per-round speedup.\n")
    rows = [r for r in d["results"] if "error" not in r]
    lm = [r for r in rows if "perplexity" in (r["baseline"]["eval"] or {})]
    enc = [r for r in rows if "topic_accuracy" in (r["baseline"]["eval"] or {})]
    if lm:
        b = lm[0]["baseline"]
        print(f"**smollm2-135m** (fp32 baseline: BBC held-out perplexity {b['eval']['perplexity']:.2f}, "
              f"{b['size_mb']:.0f} MB, decode {b['decode_tokens_per_s']:.1f} tok/s at batch 1)\n")
        print("| recipe | ppl ratio BBC (in domain) | ppl ratio tweets (other domain) | top-1 agree | request speedup (range) | prefill | decode | size | step time |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in lm:
            dl = r["delta"]
            rng = dl.get("speedup_range")
            print(f"| {r['recipe']} | ×{f(dl.get('perplexity_ratio'), 4)} | ×{f(dl.get('ood_perplexity_ratio'), 4)} | "
                  f"{f(dl.get('top1_agreement'))} | {f(dl.get('speedup'), 2)}× ({f(rng[0], 2) if rng else '–'}–{f(rng[1], 2) if rng else '–'}) | "
                  f"{f(dl.get('prefill_speedup'), 2)}× | {f(dl.get('decode_speedup'), 2)}× | {f(dl.get('size_ratio'), 3)}× | {r['step']['seconds']:.0f} s |")
        print()
    if enc:
        b = enc[0]["baseline"]
        print(f"**minilm-l6** (fp32 baseline: topic accuracy {b['eval']['topic_accuracy']:.2f}, {b['size_mb']:.1f} MB, "
              f"batch 8×128 forward p50 {b['latency_p50_ms']:.0f} ms)\n")
        print("| recipe | mean cosine vs fp32 | topic accuracy change | speedup (range) | size |")
        print("|---|---:|---:|---:|---:|")
        for r in enc:
            dl = r["delta"]
            rng = dl.get("speedup_range")
            print(f"| {r['recipe']} | {f(dl.get('mean_cosine'), 4)} | {dl.get('topic_accuracy_change', 0):+.2f} | "
                  f"{f(dl.get('speedup'), 2)}× ({f(rng[0], 2) if rng else '–'}–{f(rng[1], 2) if rng else '–'}) | {f(dl.get('size_ratio'), 3)}× |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/all.json")
