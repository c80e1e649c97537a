#!/usr/bin/env python
"""Render the measured result tables (Markdown) from the bench JSON that bench_recipes.py and
bench_prune.py write. `--update` rewrites the generated blocks of docs/results/recipes.md and
docs/results/pruning.md in place (between their `<!-- generated ... -->` markers); without it, the
tables go to stdout."""
import json
from pathlib import Path
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
    errors = [r for r in d["results"] if "error" in r]
    if errors:
        print("\nNot measured here (the recipe refused, with this message):\n")
        for r in errors:
            print(f"- {r['recipe']} on {r['model']}: {r['error']}")


def prune(path: str) -> None:
    """The pruning table: accuracy, what got smaller, and what the step cost."""
    d = json.load(open(path))
    env = d["environment"]
    print(f"Measured by `scripts/bench_prune.py` (raw: `{path}`) on {env['cpu']}, {env['threads']} threads, "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}.\n")
    for model, enc in (("smollm2-135m", False), ("minilm-l6", True)):
        rows = [r for r in d["results"] if r["model"] == model and "error" not in r]
        if not rows:
            continue
        print(f"**{model}**\n")
        if enc:
            print(f"| recipe | mean cosine vs fp32 | topic accuracy change | sparsity (pruned layers / model) | params | speedup (range) | size | step time | step peak RSS (added) |")
        else:
            print(f"| recipe | ppl ratio BBC | ppl ratio tweets | top-1 agree | sparsity (pruned layers / model) | params | prefill | decode | size | step time | step peak RSS (added) |")
        print("|---" * (9 if enc else 11) + "|")
        for r in rows:
            dl, st = r["delta"], r.get("steps") or [r["step"]]
            first = st[0]
            sp = (f"{first['sparsity']:.3f} / {first['model_sparsity']:.3f}" if first.get("sparsity") is not None else "–")
            params = (f"−{first['params_removed_fraction'] * 100:.1f} %" if first.get("params_removed_fraction") else "same")
            secs = sum(x["seconds"] for x in st)
            rss = f"{max(x['peak_rss_mb'] for x in st):.0f} MB ({max(x.get('added_rss_mb') or 0 for x in st):.0f})"
            rng = dl.get("speedup_range")
            if enc:
                print(f"| {r['recipe']} | {f(dl.get('mean_cosine'), 4)} | {dl.get('topic_accuracy_change', 0):+.2f} | {sp} | {params} | "
                      f"{f(dl.get('speedup'), 2)}× ({f(rng[0], 2) if rng else '–'}–{f(rng[1], 2) if rng else '–'}) | "
                      f"{f(dl.get('size_ratio'), 3)}× | {secs:.0f} s | {rss} |")
            else:
                print(f"| {r['recipe']} | ×{f(dl.get('perplexity_ratio'), 3)} | ×{f(dl.get('ood_perplexity_ratio'), 3)} | "
                      f"{f(dl.get('top1_agreement'))} | {sp} | {params} | {f(dl.get('prefill_speedup'), 2)}× | "
                      f"{f(dl.get('decode_speedup'), 2)}× | {f(dl.get('size_ratio'), 3)}× | {secs:.0f} s | {rss} |")
        print()


def structured(path: str) -> None:
    """The structured-pruning Pareto table: what got smaller and faster, what it cost, what recovery used."""
    d = json.load(open(path))
    env = d["environment"]
    cpus = sorted({r.get("cpu") or env["cpu"] for r in d["results"]})
    print(f"Measured by `scripts/bench_structured.py` (raw: `{path}`) on {' and '.join(cpus)} (per row), {env['threads']} threads, "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}. Speed: "
          "alternating fresh-process rounds against fp32 in the same run. Tweets: 400 scored (about 13,800 "
          "tokens); a * marks a row measured before that, on the first 32 (about 1,000 tokens, noisier).\n")
    print("| recipe | params | size | ppl ratio BBC | ppl ratio tweets | prefill | decode | step time | distill tokens (time) | measured, CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in d["results"]:
        if "error" in r:
            print(f"| {r['recipe']} | refused: {r['error']} ||||||||")
            continue
        dl, st = r["delta"], r.get("steps") or [r["step"]]
        removed = next((x["params_removed_fraction"] for x in reversed(st) if x.get("params_removed_fraction")), None)
        pb = next((x["params_before"] for x in st if x.get("params_before")), None)
        pa = next((x["params_after"] for x in reversed(st) if x.get("params_after")), None)
        params = f"−{(1 - pa / pb) * 100:.1f} %" if pa and pb else ("same" if removed is None else f"−{removed * 100:.1f} %")
        dist = next((x for x in st if x.get("method") == "distill"), None)
        bf16 = ", bf16" if dist and dist.get("precision") == "bfloat16" else ""
        dcell = (f"{dist['tokens']:,} {dist.get('source', 'text')}{bf16} ({dist['train_seconds'] / 60:.1f} min"
                 + (f" + {dist['generate_seconds'] / 60:.1f} min writing" if dist.get("generate_seconds") else "") + ")") if dist else "–"
        print(f"| {r['recipe']} | {params} | {f(dl.get('size_ratio'), 3)}× | ×{f(dl.get('perplexity_ratio'), 3)} | "
              f"×{f(dl.get('ood_perplexity_ratio'), 3)}{'' if r.get('ood_tokens_scored') else '*'} | "
              f"{f(dl.get('prefill_speedup'), 2)}× | {f(dl.get('decode_speedup'), 2)}× | "
              f"{sum(x['seconds'] for x in st):.0f} s | {dcell} | {r.get('measured', 'earlier')}, {r.get('cpu') or env['cpu']} |")


def lowbit(path: str) -> None:
    """Rotation and 3-bit rows: bits per weight as stored, BBC and tweets ratios in torch and in llama.cpp."""
    d = json.load(open(path))
    env = d["environment"]
    cpus = sorted({r.get("cpu") or env["cpu"] for r in d["results"]})
    print(f"Measured by `scripts/bench_lowbit.py` (raw: `{path}`) on {' and '.join(cpus)} (each row names its own), "
          f"{env['threads']} threads, torch {env['versions']['torch']}. Ratios against fp32 on the same windows; llama.cpp "
          "runs the artifact exported exactly to GGUF. Speed: alternating fresh-process rounds against fp32 in the same "
          "run, so a row's decode and step time compare only with rows of its own machine.\n")
    print("| recipe | bits/weight (stored) | ppl ratio BBC | tweets | llama.cpp BBC | llama.cpp tweets | GGUF | decode | step time "
          "| measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in d["results"]:
        if "error" in r:
            print(f"| {r['recipe']} | refused: {r['error']} |||||||||")
            continue
        dl, st, g = r["delta"], r.get("steps") or [r["step"]], r.get("gguf") or {}
        bpw = next((x["bits_per_weight"] for x in reversed(st) if x.get("bits_per_weight")), None)
        gb = g.get("perplexity_ratio")
        gt = g.get("ood_perplexity_ratio")
        cell = lambda v: f"×{f(v, 3)}" if isinstance(v, (int, float)) else ("–" if v is None else "refused")  # noqa: E731
        print(f"| {r['recipe']} | {f(bpw, 3)} | ×{f(dl.get('perplexity_ratio'), 3)} | ×{f(dl.get('ood_perplexity_ratio'), 3)} | "
              f"{cell(gb)} | {cell(gt)} | {g.get('size_mb', '–')} MB | {f(dl.get('decode_speedup'), 2)}× | "
              f"{sum(x['seconds'] for x in st):.0f} s | {r.get('measured', 'earlier')}, {r.get('cpu') or env['cpu']} |")


def kvcache(path: str) -> None:
    """KV cache rows: perplexity cost over long windows, bytes per token, peak memory at a long context."""
    d = json.load(open(path))
    m = d["machine"]
    print(f"Measured by `scripts/bench_kvcache.py` (raw: `{path}`) on {m['cpu']}, {m['threads']} threads, torch {m['torch']}. "
          f"Perplexity: {d['eval']}. Memory and speed: {d['bench']}.\n")
    print("| runtime | KV cache | ppl cost | KL | top-1 agreement | KV bytes/token | vs 16-bit | peak memory | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    # values per token (2 x layers x kv heads x head dim) from each runtime's fp row: fp32 in torch, f16 in llama.cpp
    values = {r["runtime"]: r["bench"]["kv_bytes_per_token"] / (4 if r["kv_cache"] == "fp" else 2) for r in d["results"]
              if r.get("kv_cache") in ("fp", "f16") and r.get("bench", {}).get("kv_bytes_per_token")}
    for r in d["results"]:
        if "error" in r:
            print(f"| {r['runtime']} | refused: {r['error']} ||||||||")
            continue
        ev, b = r["eval"], r["bench"]
        cost = f"+{(ev['perplexity_ratio'] - 1) * 100:.2f} %" if "perplexity_ratio" in ev else ("reference" if not ev else "error")
        per = b.get("kv_bytes_per_token")
        vs16 = f"{values[r['runtime']] * 2 / per:.2f}×" if per and r["runtime"] in values else "–"
        print(f"| {r['runtime']} | {r['kv_cache']} | {cost} | {f(ev.get('kl_divergence'), 4)} | {f(ev.get('top1_agreement'), 3)} | "
              f"{f(per, 0)} | {vs16} | {f(b.get('peak_memory_mb'), 0)} MB | {f(b.get('decode_tokens_per_s'), 1)} |")


def _name(recipe: str) -> str:
    return Path(recipe).name[:-5] if recipe.endswith(".yaml") else recipe


def cost(path: str) -> None:
    """Slimming cost rows: seconds per recipe and step, perplexity ratios, and where each step's time went."""
    d = json.load(open(path))
    e = d["environment"]
    print(f"Measured by `scripts/bench_cost.py` (raw: `{path}`) on {e['cpu']}, {e['threads']} threads, torch {e['torch']}, "
          f"{e['model']}; fp32 matmul peak {f(e.get('matmul_peak_gflops_fp32'), 0)} GFLOP/s (1536² GEMM). "
          "Labels: `before` = the code before this work, others = after.\n")
    base = {r["label"]: r["perplexity"] for r in d["results"] if r["recipe"] == "fp32" and "perplexity" in r}
    print("| recipe | code | total | steps | ppl ratio BBC | ppl ratio tweets | same bits as before |")
    print("|---|---|---:|---|---:|---:|---|")
    before = {r["recipe"]: r.get("digest") for r in d["results"] if r.get("label") == "before"}
    for r in d["results"]:
        if r["recipe"] == "fp32":
            continue
        if "error" in r:
            print(f"| {r['recipe']} | {r['label']} | refused: {r['error']} |||||")
            continue
        fp = base.get(r["label"]) or next(iter(base.values()))
        steps = ", ".join(f"{s['method']} {s['seconds']:.0f} s" for s in r["steps"])
        same = "–" if r["label"] == "before" or r["recipe"] not in before else ("yes" if before[r["recipe"]] == r["digest"] else "no")
        print(f"| {_name(r['recipe'])} | {r['label']} | {r['seconds']:.0f} s | {steps} | ×{r['perplexity']['bbc'] / fp['bbc']:.4f} | "
              f"×{r['perplexity']['tweets'] / fp['tweets']:.4f} | {same} |")
    print("\n| recipe | code | step | stage | seconds | share | GFLOP | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    latest = {r["recipe"]: i for i, r in enumerate(d["results"])}  # stages: `before` and each recipe's latest run
    for i, r in enumerate(d["results"]):
        if r.get("label") != "before" and latest[r["recipe"]] != i:
            continue
        for s in r.get("steps") or []:
            for st in s.get("time_breakdown") or []:
                print(f"| {_name(r['recipe'])} | {r['label']} | {s['method']} | {st['stage']} | {st['seconds']:.1f} | "
                      f"{st['share']:.0%} | {f(st.get('gflop'), 0)} | {f(st.get('gflops_per_s'), 0)} | {f(st.get('pct_of_matmul_peak'), 0)} |")


def update() -> None:
    """Regenerate the marked blocks in docs/results/ (the prose around them is kept)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    def capture(fn, *args) -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            fn(*args)
        return buf.getvalue()

    blocks = {"recipes": ("docs/results/recipes.md", capture(main, "bench-results/all.json").split("\n", 2)[2].strip("\n")),
              "pruning": ("docs/results/pruning.md", capture(prune, "bench-results/prune.json").strip("\n"))}
    if Path("bench-results/structured.json").exists():
        blocks["structured"] = ("docs/results/pruning.md", capture(structured, "bench-results/structured.json").strip("\n"))
    if Path("bench-results/lowbit.json").exists():
        blocks["lowbit"] = ("docs/results/lowbit.md", capture(lowbit, "bench-results/lowbit.json").strip("\n"))
    if Path("bench-results/kvcache.json").exists():
        blocks["kvcache"] = ("docs/results/lowbit.md", capture(kvcache, "bench-results/kvcache.json").strip("\n"))
    if Path("bench-results/cost.json").exists():
        blocks["cost"] = ("docs/results/cost.md", capture(cost, "bench-results/cost.json").strip("\n"))
    if Path("bench-results/cost-amd-epyc.json").exists():  # the same bench on the AMD EPYC machine of a later session
        blocks["cost-amd"] = ("docs/results/cost.md", capture(cost, "bench-results/cost-amd-epyc.json").strip("\n"))
    for name, (path, body) in blocks.items():
        doc = Path(path).read_text()
        pat = re.compile(rf"(<!-- generated by scripts/readme_tables.py --update: {name} -->\n).*?(\n<!-- /generated -->)", re.S)
        if not pat.search(doc):
            raise SystemExit(f"{path} has no generated block for {name}")
        Path(path).write_text(pat.sub(lambda m: m.group(1) + body + m.group(2), doc))
        print(f"updated {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--update":
        update()
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--structured":
        structured(sys.argv[2] if len(sys.argv) > 2 else "bench-results/structured.json")
    elif len(sys.argv) > 1 and sys.argv[1] in ("--lowbit", "--kvcache", "--cost"):
        {"--lowbit": lowbit, "--kvcache": kvcache, "--cost": cost}[sys.argv[1]](sys.argv[2] if len(sys.argv) > 2 else
                                                               f"bench-results/{sys.argv[1][2:]}.json")
    elif len(sys.argv) > 1 and sys.argv[1] == "--prune":
        prune(sys.argv[2] if len(sys.argv) > 2 else "bench-results/prune.json")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/all.json")
