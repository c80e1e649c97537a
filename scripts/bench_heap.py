#!/usr/bin/env python
"""What freezing the heap of slimctl's own processes (slimctl/heap.py) saves a user: the same `slimctl` commands
with the freeze on and off (SLIMCTL_HEAP_FREEZE=0), alternating in fresh processes, wall time of each. Commands:
smollm2-135m streamed through RTN int4 (one full collection per block) and `slimctl run` through RTN int4 with its
eval and a one-round bench. Writes bench-results/heap.json.

Run it alone on the machine: `.venv/bin/python scripts/bench_heap.py [--rounds 2]`."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def commands(work: Path) -> dict[str, list[str]]:
    recipe = work / "rtn.yaml"
    recipe.write_text("version: 1\nname: rtn\nsteps: [{method: rtn, bits: 4, group_size: 32}]\nbench: {repeats: 1}\n")
    return {"quantize --stream (rtn int4 g32, eval 8 documents)":
            ["quantize", MODEL, "--method", "rtn", "--bits", "4", "--group-size", "32", "--stream", "--skip-bench",
             "--max-samples", "8", "--out", str(work / "stream")],
            "run rtn int4 g32 (eval 8 documents, one bench round)":
            ["run", str(recipe), "--model", MODEL, "--max-samples", "8", "--out", str(work / "run")]}


def timed(args: list[str], freeze: bool) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMCTL_HEAP_FREEZE": "1" if freeze else "0"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "slimctl", *args, "--overwrite"], capture_output=True, text=True, cwd=REPO, env=env)
    if p.returncode not in (0, 1):
        raise SystemExit(f"slimctl {' '.join(args[:2])} failed: {p.stderr[-800:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch

    from slimctl.machine import cpu_name

    rows = []
    with tempfile.TemporaryDirectory(prefix="slimctl-heap-") as tmp:
        for name, args in commands(Path(tmp)).items():
            times: dict[str, list[float]] = {"frozen": [], "not frozen": []}
            for r in range(a.rounds):  # alternate which goes first
                for freeze in ((True, False) if r % 2 == 0 else (False, True)):
                    key = "frozen" if freeze else "not frozen"
                    times[key].append(round(timed(args, freeze), 1))
                    print(name, key, times[key][-1], flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"command": name, "seconds": times, "median_s": med,
                         "saved_share": round(1 - med["frozen"] / med["not frozen"], 3)})
    doc = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__, "model": MODEL,
           "rounds": a.rounds, "rows": rows}
    out = REPO / "bench-results" / "heap.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
