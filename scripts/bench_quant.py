#!/usr/bin/env python
"""Run every quantization recipe on smollm2-135m and minilm-l6 and write bench-results/quant.json.

smollm2-135m: held-out BBC perplexity (in domain), tweets perplexity (out of domain), prefill and
decode speed, size; minilm-l6: embedding fidelity, topic accuracy, speed, size. Same options as
scripts/bench_recipes.py, whose runner this is with the quantization recipes preselected.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, main  # noqa: E402

QUANT = ["int8-weight-only", "int8-dynamic", "w8a8-smoothquant", "int4-rtn-g128", "int4-gptq-g128",
         "int4-rtn-g64", "int4-gptq-g64"]

if __name__ == "__main__":
    sys.exit(main("bench-results/quant.json", [str(REPO / "recipes" / f"{n}.yaml") for n in QUANT]))
