#!/usr/bin/env python
"""What quantizing the LM head adds to an int4 model: perplexity, size and decode speed, per built-in causal LM.

For each model: `int4-gptq-g32` (`slimctl run --skip-bench`, BBC perplexity against fp32), then an `lm_head` step on
that artifact twice (`slimctl quantize ARTIFACT --method lm_head`: int8 per row, once with the input table kept float,
once with `embeddings: true`), each run measuring itself against the int4 artifact in the same run (BBC perplexity,
size, decode in alternating fresh-process rounds), and the int4 and int4 + int8-head artifacts decoding step for step
in fresh processes (slimctl.bench.interleaved: ratios paired milliseconds apart). Writes bench-results/lm-head.json.
Run it alone.

Usage: .venv/bin/python scripts/bench_lm_head.py [--models smollm2-135m,gemma3-270m] [--interleave 4] [--work DIR]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "slimctl", *args, "--json"], capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise SystemExit(f"slimctl {args[0]}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout)


def _head_row(int4: Path, dest: Path, embeddings: bool) -> dict:
    if (dest / "report.json").exists():  # a finished run in --work: reused
        rep = json.loads((dest / "report.json").read_text())
    else:
        args = ["quantize", str(int4), "--method", "lm_head", "--out", str(dest), "--overwrite"]
        p = subprocess.run([sys.executable, "-m", "slimctl", *args, *(["--set", "embeddings=true"] if embeddings else []),
                            "--json"], capture_output=True, text=True)
        if p.returncode == 2:  # refused (e.g. a scaled lookup table): recorded, not fatal
            return {"embeddings_int8": embeddings, "refused": (p.stderr.strip().splitlines() or ["?"])[-1]}
        if p.returncode not in (0, 1):
            raise SystemExit(f"slimctl quantize: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        rep = json.loads(p.stdout)
    d, step = rep["delta"], rep["slimmed"]["steps"][0]
    return {"embeddings_int8": embeddings, "vs_int4_perplexity_ratio": d["perplexity_ratio"], "vs_int4_kl": d.get("kl_divergence"),
            "vs_int4_size_ratio": d.get("size_ratio"), "size_mb": rep["slimmed"]["bench"].get("size_mb"),
            "int4_size_mb": rep["baseline"]["bench"].get("size_mb"),
            "vs_int4_decode_speedup": d.get("decode_speedup"),
            "rounds_decode_tokens_per_s": {s: rep[s]["bench"].get("rounds_decode_tokens_per_s") for s in ("baseline", "slimmed")},
            "kernels": rep["slimmed"]["bench"].get("kernels"), "untied": step.get("untied"), "warnings": rep.get("warnings"),
            "step_seconds": step.get("seconds"), "environment": rep["environment"]}


def _interleaved(a: Path, b: Path, n: int) -> dict:
    from slimctl.bench.interleaved import in_processes

    ups = sorted(r["b_speedup"] for r in in_processes(a, b, n, say=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)))
    return {"head8_decode_speedup_per_process": ups, "head8_decode_speedup_median": statistics.median(ups),
            "processes_head8_faster": sum(u > 1 for u in ups)}


def _model(model: str, work: Path, interleave: int) -> dict:
    int4 = work / "int4"
    done = int4 / "row.json"
    if not done.exists():
        print(f"[bench] {model}: int4-gptq-g32", file=sys.stderr, flush=True)
        rep = _cli("run", str(REPO / "recipes" / "int4-gptq-g32.yaml"), "--model", model, "--out", str(int4),
                   "--skip-bench", "--overwrite")
        done.write_text(json.dumps({"bbc_perplexity_ratio": rep["delta"]["perplexity_ratio"], "size_ratio": rep["delta"].get("size_ratio")}))
    row = {"model": model, "int4_gptq_g32": json.loads(done.read_text())}
    for emb, name in ((False, "head8"), (True, "head8_emb8")):
        print(f"[bench] {model}: lm_head ({name})", file=sys.stderr, flush=True)
        row[name] = _head_row(int4 / "model", work / name, emb)
    kept = work / "interleaved.json"
    if interleave and kept.exists():
        row["interleaved"] = json.loads(kept.read_text())
    elif interleave:
        row["interleaved"] = _interleaved(int4 / "model", work / "head8" / "model", interleave)
        kept.write_text(json.dumps(row["interleaved"]))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--interleave", type=int, default=4)
    ap.add_argument("--out", default="bench-results/lm-head.json")
    ap.add_argument("--work", help="keep the artifacts here; finished runs are reused on the next call")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpd:
        base = Path(args.work or tmpd)
        rows = [_model(m, base / m, args.interleave) for m in args.models.split(",")]
    env = rows[0]["head8"].get("environment")
    for r in rows:
        for k in ("head8", "head8_emb8"):
            r[k].pop("environment", None)
    doc = {"measured": time.strftime("%Y-%m-%d"), "environment": env, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "int4_gptq_g32"} for r in rows], indent=1)[:4000])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
