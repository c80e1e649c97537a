#!/usr/bin/env python
"""The peer for issue #18: llm-compressor's AWQModifier + QuantizationModifier (W4A16, symmetric int4
groups) on a Hugging Face folder, calibrated on the exact texts slimctl used (a .jsonl written by
scripts/bench_awq.py). Runs in llm-compressor's own venv, not slimctl's:

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install -c scripts/constraints-cpu.txt \\
        llmcompressor==0.14.0.1 transformers==5.17.0
    /tmp/lcvenv/bin/python scripts/peer_awq.py MODEL_DIR CALIB.jsonl OUT_DIR --group-size 64 --seq-len 256

Prints one JSON line: seconds of the oneshot call, versions, and the options used. The saved folder is
compressed-tensors (pack-quantized), which slimctl eval loads.
"""
import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()

    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies; pinning needs an
        # accelerator and raises on a CPU-only machine. Pinning does not change any value: make it a no-op.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in open(a.calib, encoding="utf-8") if line.strip()]
    enc = [tok(t, truncation=True, max_length=a.seq_len) for t in texts]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc], "attention_mask": [e["attention_mask"] for e in enc]})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=a.group_size)
    recipe = [AWQModifier(duo_scaling=True, n_grid=20),
              QuantizationModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                                   ignore=["lm_head"])]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.seq_len, num_calibration_samples=len(ds),
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"peer": "llm-compressor", "version": llmcompressor.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "recipe": "AWQModifier(duo_scaling, n_grid=20) + QuantizationModifier W4A16 "
                      f"symmetric group {a.group_size}, lm_head ignored", "calibration_samples": len(ds),
                      "calibration_tokens": sum(len(e["input_ids"]) for e in enc), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
