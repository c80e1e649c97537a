#!/usr/bin/env python
"""Task accuracy (lm-evaluation-harness) of shipped recipes on smollm2-135m: one `slimctl run` per
recipe with `eval.tasks: [bbc-topic]` added, so the baseline and the slimmed model are scored side by
side on the models in memory. Writes bench-results/tasks.json and prints the README table.

Usage: .venv/bin/python scripts/bench_tasks.py [--model smollm2-135m] [--tasks bbc-topic ...]
           [--recipes int8-weight-only w8a8-smoothquant ...] [--out bench-results/tasks.json] [--keep DIR]
Run it alone on the machine (it takes about 20 minutes on 2 cores, GPTQ most of it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["int8-weight-only", "w8a8-smoothquant", "int4-gptq-g64", "int4-rtn-g64", "nf4"]


def _run(recipe: str, model: str, tasks: list[str], tmp: Path, keep: Path | None = None) -> dict:
    doc = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    doc["eval"] = {**(doc.get("eval") or {}), "tasks": tasks}
    doc["bench"] = {**(doc.get("bench") or {}), "skip": True}
    path = tmp / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(doc))
    t0 = time.perf_counter()
    dest = (keep or tmp) / recipe
    p = subprocess.run([sys.executable, "-m", "slimctl", "run", str(path), "--model", model, "--out", str(dest),
                        "--json", "--overwrite"], capture_output=True, text=True, cwd=REPO)
    if p.returncode not in (0, 1):
        return {"recipe": recipe, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    rep = json.loads(p.stdout)
    ev_b, ev_s = rep["baseline"]["eval"], rep["slimmed"]["eval"]
    return {"recipe": recipe, "seconds": round(time.perf_counter() - t0, 1),
            "perplexity_ratio": rep["delta"].get("perplexity_ratio"), "tokens_scored": rep["delta"].get("tokens_scored"),
            "baseline": {n: t["reference_metrics"] for n, t in ev_b["tasks"].items()},
            "slimmed": {n: t["metrics"] for n, t in ev_s["tasks"].items()},
            "samples": {n: t["samples"] for n, t in ev_s["tasks"].items()},
            "drop_pct": {n: t.get("drop_pct") for n, t in ev_s["tasks"].items()}}


def table(res: dict) -> str:
    rows = [r for r in res["results"] if "error" not in r]
    if not rows:
        return ""
    lines = []
    for task in rows[0]["slimmed"]:
        lines += [f"{task}, {rows[0]['samples'][task]} documents:", "",
                  "| model | acc | acc_norm | acc drop vs fp32 | held-out ppl ratio |", "|---|---|---|---|---|"]
        b = rows[0]["baseline"][task]
        lines.append(f"| fp32 (baseline) | {b['acc']:.3f} ± {b['acc_stderr']:.3f} | {b['acc_norm']:.3f} ± {b['acc_norm_stderr']:.3f} | – | 1 |")
        for r in rows:
            m = r["slimmed"][task]
            lines.append(f"| {r['recipe']} | {m['acc']:.3f} ± {m['acc_stderr']:.3f} | {m['acc_norm']:.3f} ± {m['acc_norm_stderr']:.3f} "
                         f"| {r['drop_pct'][task]:+.1f} % | x{r['perplexity_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", nargs="+", default=["bbc-topic"])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--out", default="bench-results/tasks.json")
    ap.add_argument("--keep", type=Path, help="keep each run's folder (artifact + report) here, e.g. for scripts/bench_speed.py")
    a = ap.parse_args()
    out = REPO / a.out
    sys.path.insert(0, str(REPO))
    from slimctl.bench.measure import cpu_name

    res = {"model": a.model, "tasks": a.tasks, "machine": f"{cpu_name()}, {os.cpu_count()} vCPUs",
           "date": time.strftime("%Y-%m-%d"), "results": []}
    with tempfile.TemporaryDirectory() as tmpd:
        for r in a.recipes:
            print(f"[tasks] {r}", file=sys.stderr, flush=True)
            res["results"].append(_run(r, a.model, a.tasks, Path(tmpd), a.keep))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2) + "\n")  # after every row: a stopped run keeps what it measured
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
