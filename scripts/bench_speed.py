#!/usr/bin/env python
"""Decode speed of slimctl's formats on the CPU, eager and compiled, from alternating fresh-process
rounds: smollm2-135m at batch 1 with a 128-token prompt and 32 / 128 greedy tokens. Writes
bench-results/speed.json and prints the README table. Run it alone on the machine.

Rows: fp32 and bf16 (the built-in model; bf16 is a cast), and the artifacts of int8-weight-only,
int4-gptq-g64, int4-rtn-g64, w8a8-smoothquant and nf4 (made by `slimctl run RECIPE --skip-bench`, or
taken from `scripts/bench_tasks.py --keep DIR`, whose reports also give each recipe's held-out
perplexity ratio measured through the same kernels and activation dtype). Each process measures the
eager loop and the compiled one (static KV cache + torch.compile), so every row has both.

Usage: .venv/bin/python scripts/bench_speed.py --artifacts DIR [--rounds 2] [--decode 32 128]
           [--model smollm2-135m] [--encoder minilm-l6] [--out bench-results/speed.json]
The encoder rows (batch 8 x 128 forward: fp32, bf16, int8-bf16-encoder) come last.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPES = ["int8-weight-only", "int4-gptq-g64", "int4-rtn-g64", "w8a8-smoothquant", "nf4"]


def _artifact(recipe: str, model: str, folder: Path) -> Path:
    dest = folder / recipe
    if not (dest / "model").exists():
        print(f"[speed] making {recipe}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "slimctl", "run", str(REPO / "recipes" / f"{recipe}.yaml"), "--model", model,
                        "--out", str(dest), "--skip-bench", "--overwrite"], check=False, cwd=REPO, capture_output=True)
    return dest


def _measure(folder: str, spec, dtype: str | None) -> dict:
    from slimctl.bench import bench_isolated

    r = bench_isolated(folder, spec, dtype=dtype).to_json()
    modes = r.get("modes") or {"eager": r}
    return {m: {"decode_tokens_per_s": x["decode_tokens_per_s"], "request_p50_ms": x["latency_ms"]["p50"],
                "prefill_p50_ms": x["prefill_ms"]["p50"], "compile_seconds": x.get("compile_seconds")} for m, x in modes.items()} | {
        "dtype": r.get("dtype"), "kernels": (r.get("kernels") or {}).get("kernels"), "notes": r.get("notes")}


def main() -> int:
    from slimctl.models import resolve
    from slimctl.recipe import BenchSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--out", default="bench-results/speed.json")
    ap.add_argument("--encoder", default="minilm-l6", help="also the encoder rows for this model ('' to skip)")
    ap.add_argument("--only-encoder", action="store_true", help="re-measure the encoder rows into an existing --out")
    a = ap.parse_args()
    out = REPO / a.out
    if a.only_encoder:
        doc = json.loads(out.read_text())
        doc["encoder"] = encoder(a.encoder, a.artifacts, max(a.rounds, 3))
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(table(doc))
        return 0
    base = str(resolve(a.model)[0])
    rows = {"fp32": (base, None), "bf16": (base, "bf16")}
    for r in RECIPES:
        rows[r] = (str(_artifact(r, a.model, a.artifacts) / "model"), None)
    ppl = {}
    for r in RECIPES:
        rep = a.artifacts / r / "report.json"
        if rep.exists():
            d = json.loads(rep.read_text())["delta"]
            ppl[r] = {"perplexity_ratio": d.get("perplexity_ratio"), "tokens_scored": d.get("tokens_scored")}
    from slimctl.bench.measure import cpu_name

    doc = {"model": a.model, "machine": f"{cpu_name()}, {__import__('os').cpu_count()} vCPUs", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "batch": 1, "prompt_tokens": 128, "rounds": a.rounds, "perplexity": ppl, "results": {}}
    for n in a.decode:
        spec = BenchSpec(batch_size=1, seq_len=128, decode_tokens=n, warmup=1, min_iters=3, min_seconds=0, compile="auto")
        res = doc["results"].setdefault(str(n), {name: [] for name in rows})
        for i in range(a.rounds):  # alternating: each round measures every row once, in a fresh process each
            for name, (folder, dtype) in rows.items():
                print(f"[speed] decode {n}, round {i + 1}/{a.rounds}: {name}", file=sys.stderr, flush=True)
                try:
                    res[name].append(_measure(folder, spec, dtype))
                except Exception as e:  # noqa: BLE001  one row failing must not lose the others
                    res[name].append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
                out.write_text(json.dumps(doc, indent=2) + "\n")
    if a.encoder:
        doc["encoder"] = encoder(a.encoder, a.artifacts, max(a.rounds, 3))
        out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    return 0


def encoder(model: str, folder: Path, rounds: int) -> dict:
    """Batch 8 x 128 forward of an encoder: fp32, bf16 and the int8-bf16-encoder artifact, alternating."""
    from slimctl.bench import bench_isolated
    from slimctl.models import resolve
    from slimctl.recipe import BenchSpec

    base = str(resolve(model)[0])
    art = _artifact("int8-bf16-encoder", model, folder / model)
    rows = {"fp32": (base, None), "bf16": (base, "bf16"), "int8-bf16-encoder": (str(art / "model"), None)}
    spec = BenchSpec(batch_size=8, seq_len=128, warmup=2, min_iters=10, min_seconds=2)
    res = {name: [] for name in rows}
    for i in range(rounds):
        for name, (f, dtype) in rows.items():
            print(f"[speed] {model} round {i + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            r = bench_isolated(f, spec, dtype=dtype).to_json()
            res[name].append({"p50_ms": r["latency_ms"]["p50"], "size_mb": r["size_mb"], "dtype": r["dtype"],
                              "kernels": (r.get("kernels") or {}).get("kernels")})
    rep = json.loads((art / "report.json").read_text())
    return {"model": model, "batch": "8 x 128", "rounds": res, "mean_cosine": rep["delta"].get("mean_cosine"),
            "topic_accuracy_change": rep["delta"].get("topic_accuracy_change")}


def encoder_table(enc: dict) -> str:
    med = {n: sorted(r["p50_ms"] for r in rs)[len(rs) // 2] for n, rs in enc["rounds"].items()}
    rng = {n: (min(r["p50_ms"] for r in rs), max(r["p50_ms"] for r in rs)) for n, rs in enc["rounds"].items()}
    size = {n: rs[0]["size_mb"] for n, rs in enc["rounds"].items()}
    lines = ["", f"{enc['model']}, batch {enc['batch']} forward (p50 ms, median of {len(enc['rounds']['fp32'])} alternating "
             "fresh-process rounds, range in brackets):", "",
             "| row | p50 ms | speed vs fp32 | speed vs bf16 | size vs fp32 |", "|---|---|---|---|---|"]
    for n in enc["rounds"]:
        lines.append(f"| {n} | {med[n]:.1f} [{rng[n][0]:.1f}–{rng[n][1]:.1f}] | {med['fp32'] / med[n]:.2f}x | "
                     f"{med['bf16'] / med[n]:.2f}x | {size[n] / size['fp32']:.3f}x |")
    lines.append(f"\nint8-bf16-encoder: mean cosine {enc['mean_cosine']:.4f} vs fp32, topic accuracy change "
                 f"{enc['topic_accuracy_change']:+.2f}")
    return "\n".join(lines)


def _span(rounds: list[dict], mode: str, key: str = "decode_tokens_per_s") -> tuple[float, float, float] | None:
    vals = sorted(r[mode][key] for r in rounds if mode in r)
    if not vals:
        return None
    return vals[len(vals) // 2] if len(vals) % 2 else sum(vals[len(vals) // 2 - 1:len(vals) // 2 + 1]) / 2, vals[0], vals[-1]


def table(doc: dict) -> str:
    lines = [encoder_table(doc["encoder"])] if doc.get("encoder") else []
    for n, res in doc["results"].items():
        fp32 = _span(res["fp32"], "eager")
        best_base = max((s[0] for name in ("fp32", "bf16") for m in ("eager", "compiled") if (s := _span(res[name], m))), default=None)
        lines += ["", f"decode {n} tokens after a 128-token prompt, batch 1 (tokens/s, median of {doc['rounds']} fresh-process "
                  f"rounds, range in brackets; x = vs fp32 eager / vs the fastest fp32 or bf16 row):", "",
                  "| row | activations | eager tok/s | compiled tok/s | best vs fp32 eager | best vs fastest baseline | held-out ppl ratio |",
                  "|---|---|---|---|---|---|---|"]
        for name, rounds in res.items():
            ok = [r for r in rounds if "error" not in r]
            if not ok:
                lines.append(f"| {name} | – | error: {rounds[0].get('error', '?')[:80]} | | | | |")
                continue
            e, c = _span(ok, "eager"), _span(ok, "compiled")
            best = max(x[0] for x in (e, c) if x)
            cell = lambda s: f"{s[0]:.1f} [{s[1]:.1f}–{s[2]:.1f}]" if s else "–"  # noqa: E731
            p = (doc["perplexity"].get(name) or {}).get("perplexity_ratio")
            lines.append(f"| {name} | {ok[0]['dtype']} | {cell(e)} | {cell(c)} | {best / fp32[0]:.2f}x | {best / best_base:.2f}x | "
                         f"{f'x{p:.4f}' if p else '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
