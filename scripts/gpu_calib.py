#!/usr/bin/env python
"""Calibration on a GPU against the CPU (issue #33 item 4): the seconds GPTQ g64 and AWQ + GPTQ g32 take per
block of a random-initialised model of a real architecture (smollm2-135m's, Llama-3.2-1B's), with the recipe's
`device` set to cuda and to cpu, the stages' breakdown, and the peak GPU memory. Random weights: the time of these
steps does not depend on the weights' values, and a GPU machine without network cannot hold the real checkpoint
(smollm2-135m in bf16 is 260 MB, over what a device call carries). Calibration text and a tokenizer come from
files (`--data`, `--tokenizer`), so a bare machine needs no corpus package. The models are cut to `--blocks`
blocks so that the CPU side fits a device call; per-block seconds are what compares. Writes one JSON document.

Usage: python scripts/gpu_calib.py --out gpu-calib.json --tokenizer DIR --data FILE [--blocks 4] [--devices cuda,cpu]
On a CPU only: python scripts/gpu_calib.py --out /tmp/c.json --tokenizer DIR --data FILE --quick --devices cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True}
TINY = dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2)
RECIPES = {  # the shipped recipes' calibration (recipes/int4-gptq-g64.yaml, recipes/int4-awq-gptq-g32.yaml)
    "int4-gptq-g64": [{"method": "gptq", "bits": 4, "group_size": 64, "fp16_scales": True}],
    "int4-awq-gptq-g32": [{"method": "awq", "bits": 4, "group_size": 32, "fp16_scales": True},
                          {"method": "gptq", "bits": 4, "group_size": 32, "fp16_scales": True, "calib_dtype": "auto"}],
}


def build(arch: dict, blocks: int, tokenizer: str, folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**arch, "num_hidden_layers": min(blocks, arch["num_hidden_layers"])})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def run_one(folder: Path, recipe: str, device: str, data: str, samples: int) -> dict:
    import torch

    from slimctl.models import load
    from slimctl.recipe import from_dict
    from slimctl.steps import UI, apply_steps

    m = load(str(folder))
    steps = [{**s, "calib_data": data, "calib_samples": samples} for s in RECIPES[recipe]]
    r = from_dict({"version": 1, "device": device, "steps": steps}, "gpu_calib")
    t0 = time.perf_counter()
    _, records, _ = apply_steps(m.model, m.tokenizer, r, m.kind, UI())
    seconds = time.perf_counter() - t0
    blocks = m.model.config.num_hidden_layers
    out = {"seconds": round(seconds, 2), "seconds_per_block": round(seconds / blocks, 3), "blocks": blocks,
           "steps": [{k: s.model_dump().get(k) for k in ("method", "seconds", "calibration_device", "peak_gpu_mb",
                                                         "calibration_precision", "time_breakdown")} for s in records]}
    del m
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a folder with a tokenizer (e.g. smollm2-135m's)")
    ap.add_argument("--data", required=True, help="calibration text, .txt or .jsonl")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--archs", default="smollm2-135m,llama-1b")
    ap.add_argument("--recipes", default="int4-gptq-g64,int4-awq-gptq-g32")
    ap.add_argument("--blocks", type=int, default=4, help="blocks kept per model (per-block time is what compares)")
    ap.add_argument("--samples", type=int, default=64, help="calibration texts (the recipes' default: 64)")
    ap.add_argument("--quick", action="store_true", help="a tiny model (CPU smoke test of this script)")
    args = ap.parse_args()

    import torch

    from slimctl.bench.catalogue import ARCHITECTURES

    archs = {"tiny": TINY} if args.quick else {"smollm2-135m": SMOLLM2, **ARCHITECTURES}
    doc = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpu_threads": torch.get_num_threads(), "blocks": args.blocks, "samples": args.samples, "results": []}
    names = ["tiny"] if args.quick else args.archs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = build(archs[name], args.blocks, args.tokenizer, Path(tmp) / name)
            for recipe in args.recipes.split(","):
                for device in args.devices.split(","):
                    row = {"arch": name, "recipe": recipe, "device": device}
                    try:
                        row.update(run_one(folder, recipe, device, args.data, 4 if args.quick else args.samples))
                    except Exception as e:  # one failure is a row, not the end of the check
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                    doc["results"].append(row)
                    print(json.dumps({k: row.get(k) for k in ("arch", "recipe", "device", "seconds", "error")}), flush=True)
                    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0 if all("error" not in r for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
