#!/usr/bin/env python
"""Run every pruning recipe on smollm2-135m and minilm-l6 and write bench-results/prune.json.

smollm2-135m: held-out BBC perplexity (in domain), tweets perplexity (out of domain), prefill and
decode speed, size, parameters; minilm-l6: embedding fidelity, topic accuracy, speed, size. Each
row also carries the pruning step's sparsity (over pruned layers and over the whole model), its
time, the process peak RSS and the RSS the step added on top of the models already in memory.
Same options as scripts/bench_recipes.py, whose runner this is with the pruning recipes preselected.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, main  # noqa: E402

PRUNE = ["prune-magnitude-50", "prune-wanda-50", "prune-sparsegpt-50", "prune-magnitude-2of4", "prune-wanda-2of4",
         "prune-sparsegpt-2of4", "prune-heads-ffn-25", "prune-ffn-25", "prune-2of4-int4"]

if __name__ == "__main__":
    sys.exit(main("bench-results/prune.json", [str(REPO / "recipes" / f"{n}.yaml") for n in PRUNE]))
