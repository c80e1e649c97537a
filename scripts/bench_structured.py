#!/usr/bin/env python
"""Structured pruning on smollm2-135m: reconstruction, global allocation, depth, distillation, and
pruning + int4 against the same int4 recipe alone; writes bench-results/structured.json.

Each row is a `slimctl run` of a shipped recipe (baseline fp32 and the slimmed model measured in the
same run, speed from alternating fresh-process rounds), plus the perplexity ratio on 400 tweets (another
domain than the BBC text calibration and distillation read). Run it alone: timings share the CPU.
`python scripts/readme_tables.py --update` then regenerates the table in docs/results/pruning.md.
Re-measure some rows only: `scripts/bench_recipes.py --models smollm2-135m --recipes recipes/X.yaml
--out bench-results/structured.json --merge` (rows keep their date and CPU). Pruning + int4 head to head
with int4 alone: scripts/bench_prune_int4.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, main  # noqa: E402

RECIPES = ["prune-ffn-25", "prune-ffn-25-global", "prune-20-global-4shot", "int4-gptq-g32", "prune-15-global-gptq-g32",
           "prune-20-global-distill"]

if __name__ == "__main__":
    sys.argv += [] if "--models" in sys.argv else ["--models", "smollm2-135m"]
    sys.exit(main("bench-results/structured.json", [str(REPO / "recipes" / f"{n}.yaml") for n in RECIPES]))
