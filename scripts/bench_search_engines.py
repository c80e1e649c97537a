#!/usr/bin/env python
"""The same `slimctl search` with the local engine and with Ray (a local instance slimctl starts and
stops), each from a fresh output folder in its own process: wall time of each, and whether every
column that is not a timing agrees (status, pre-filter drop, drop, size, budget verdict, winner).
Also compares the accuracy columns with an earlier search's JSON where candidate names overlap.
Writes bench-results/search-engines.json.

Run it alone on the machine:
  .venv/bin/python scripts/bench_search_engines.py [--model minilm-l6] [--max-drop 1%] [-- extra search flags]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIMCTL = str(Path(sys.executable).parent / "slimctl")
SAME = ("status", "prefilter_drop", "drop", "size_ratio", "meets_budget", "same_as")  # not timings


def search(model: str, max_drop: str, engine: str, out: Path, extra: list[str]) -> tuple[dict, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [SLIMCTL, "search", model, "--max-drop", max_drop, "--engine", engine, "--out", str(out), "--json", *extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 1):  # 1: no candidate within budget, still a result
        sys.exit(f"search with --engine {engine} failed (exit {p.returncode})")
    return json.loads(p.stdout), wall, p.returncode


def columns(res: dict) -> dict[str, dict]:
    return {c["name"]: {k: c.get(k) for k in SAME} for c in res["candidates"]}


def differences(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    out = [f"{n}: only in one" for n in sorted(set(a) ^ set(b))]
    for n in sorted(set(a) & set(b)):
        out += [f"{n}.{k}: {a[n][k]!r} vs {b[n][k]!r}" for k in SAME if a[n][k] != b[n][k]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--max-drop", default="1%")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "search-engines")
    ap.add_argument("--earlier", type=Path, default=REPO / "bench-results" / "search-minilm.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "search-engines.json")
    ap.add_argument("extra", nargs="*", help="more `slimctl search` flags (after --)")
    a = ap.parse_args()
    runs = {}
    for engine in ("local", "ray"):
        res, wall, rc = search(a.model, a.max_drop, engine, a.work / engine, a.extra)
        runs[engine] = {"wall_s": round(wall, 1), "exit": rc, "winner": res["winner"], "engine": res.get("engine"),
                        "candidates": columns(res), "nodes": {c["name"]: c.get("node") for c in res["candidates"]}}
        print(f"{engine}: {wall / 60:.1f} min, winner {res['winner']}", file=sys.stderr, flush=True)
    diff = differences(runs["local"]["candidates"], runs["ray"]["candidates"])
    from slimctl.machine import cpu_name

    doc = {"command": f"slimctl search {a.model} --max-drop {a.max_drop} --engine local|ray " + " ".join(a.extra),
           "machine": f"{cpu_name()}, {os.cpu_count()} vCPUs, Python {platform.python_version()}", "runs": runs,
           "same_winner": runs["local"]["winner"] == runs["ray"]["winner"], "non_timing_differences": diff}
    if a.earlier.exists():  # an earlier search (older code, maybe other candidates): accuracy where names overlap
        old = columns(json.loads(a.earlier.read_text()))
        doc["earlier"] = {"file": str(a.earlier.relative_to(REPO)), "winner": json.loads(a.earlier.read_text())["winner"],
                          "drop_vs_ray": {n: [old[n]["drop"], runs["ray"]["candidates"][n]["drop"]]
                                          for n in sorted(set(old) & set(runs["ray"]["candidates"]))}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("same_winner", "non_timing_differences")}, indent=2))
    print(f"local {runs['local']['wall_s'] / 60:.1f} min, ray {runs['ray']['wall_s'] / 60:.1f} min -> {a.out}")


if __name__ == "__main__":
    main()
