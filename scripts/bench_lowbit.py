#!/usr/bin/env python
"""Rotation, the scale search, int3 and mixed 3-bit on smollm2-135m, next to the unrotated int4 recipes; writes
bench-results/lowbit.json.

Each row is a `slimctl run` of a shipped recipe (fp32 baseline and slimmed model in the same run, speed from
alternating fresh-process rounds), the perplexity ratio on 400 tweets, and the artifact exported exactly to GGUF
and scored by llama.cpp on the same windows. Bits per weight are counted as stored (codes, scales, zero points).
Run it alone: timings share the CPU. `python scripts/readme_tables.py --update` regenerates docs/results/lowbit.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, main  # noqa: E402

RECIPES = ["int4-gptq-g32", "int4-gptq-g32-mse", "rotate-gptq-g32", "int3-gptq-g32", "int3-awq-gptq-g32", "mixed-3.5bit",
           "rotate-mixed-3.5bit", "int4-awq-gptq-g32", "rotate-awq-gptq-g32", "rotate-mixed-4.5bit",
           "rotate-autoround-g32"]

if __name__ == "__main__":
    sys.argv += [] if "--models" in sys.argv else ["--models", "smollm2-135m"]
    sys.argv += [] if "--gguf" in sys.argv else ["--gguf"]
    sys.exit(main("bench-results/lowbit.json", [str(REPO / "recipes" / f"{n}.yaml") for n in RECIPES]))
