#!/usr/bin/env python
"""GPTQ against GPTAQ (gptq's `gptaq: true`, asymmetric calibration) on the same recipes: BBC and tweets perplexity
against fp32, and the GPTQ step's time. For each base recipe the script runs it as shipped, then with `gptaq: true`
on its gptq step (and each `--alpha` other than 0.25), `slimctl run --skip-bench` and `slimctl eval --data` on 400
tweets. Writes bench-results/gptaq.json. Run it alone.

Usage: .venv/bin/python scripts/bench_gptaq.py [--recipes recipes/int4-gptq-g32.yaml,recipes/rotate-gptq-g32.yaml]
           [--alpha 0.25,0.5] [--work DIR]   (a finished run in DIR is reused)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, ood_eval, ood_file  # noqa: E402


def _variants(recipe: Path, alphas: list[float]) -> list[tuple[str, dict]]:
    doc = yaml.safe_load(recipe.read_text())
    out = [(recipe.stem, doc)]
    for a in alphas:
        v = json.loads(json.dumps(doc))
        for s in v["steps"]:
            if s["method"] == "gptq":
                s.update({"gptaq": True, **({} if a == 0.25 else {"gptaq_alpha": a})})
        out.append((f"{recipe.stem}+gptaq" + ("" if a == 0.25 else f"-a{a}"), v))
    return out


def _row(name: str, doc: dict, model: str, work: Path, tweets: Path | None) -> dict:
    dest = work / name
    if not (dest / "report.json").exists():
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        p = subprocess.run([sys.executable, "-m", "slimctl", "run", str(work / f"{name}.yaml"), "--model", model,
                            "--out", str(dest), "--skip-bench", "--overwrite", "--json"], capture_output=True, text=True)
        if p.returncode not in (0, 1):
            raise SystemExit(f"{name}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    rep = json.loads((dest / "report.json").read_text())
    gptq = next(s for s in rep["slimmed"]["steps"] if s["method"] == "gptq")
    row = {"recipe": name, "bbc_perplexity_ratio": rep["delta"]["perplexity_ratio"], "gptq_seconds": gptq["seconds"],
           "bits_per_weight": gptq.get("bits_per_weight"), "environment": rep["environment"]}
    kept = work / f"{name}.tweets.json"
    if not kept.exists() and tweets:
        ev = ood_eval(dest / "model", model, tweets)
        kept.write_text(json.dumps(ev))
    if kept.exists():
        ev = json.loads(kept.read_text())
        if ev:
            row["tweets_perplexity_ratio"], row["tweets_tokens"] = ev
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=f"{REPO}/recipes/int4-gptq-g32.yaml,{REPO}/recipes/rotate-gptq-g32.yaml")
    ap.add_argument("--alpha", default="0.25")
    ap.add_argument("--out", default="bench-results/gptaq.json")
    ap.add_argument("--work")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alpha.split(",") if a]
    with tempfile.TemporaryDirectory() as tmpd:
        work = Path(args.work or tmpd)
        work.mkdir(parents=True, exist_ok=True)
        tweets = ood_file(work)
        rows = [_row(n, d, args.model, work, tweets) for r in args.recipes.split(",") for n, d in _variants(Path(r), alphas)]
    env = rows[0].pop("environment")
    for r in rows[1:]:
        r.pop("environment", None)
    doc = {"model": args.model, "measured": time.strftime("%Y-%m-%d"), "environment": env, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"{r['recipe']:32s} BBC x{r['bbc_perplexity_ratio']:.4f}  tweets x{r.get('tweets_perplexity_ratio', float('nan')):.4f}"
              f"  gptq {r['gptq_seconds']:.0f} s")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
