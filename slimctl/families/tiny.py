"""Tiny random-weight models of each registered family's real transformers architecture (hidden 64, two
blocks), for the family x method test matrix and scripts/bench_families.py. Each family's registration names its
tiny config (`tiny=`, from the shapes here)."""
from __future__ import annotations

from typing import Any

LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=512, head_dim=16)
NO_HD = {k: v for k, v in LM.items() if k != "head_dim"}  # families that derive the head size
MOE = dict(LM, num_local_experts=4, num_experts_per_tok=2)
ENC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)


def configs() -> dict[str, tuple[str, dict[str, Any], str]]:
    """family -> (transformers config class, its keyword arguments, task head: "causal-lm" or "encoder"): the
    `tiny=` of each family's registration."""
    from .registry import load_all

    return {name: fam.tiny for name, fam in load_all().items() if fam.tiny is not None}


def build(family: str, tokenizer, seed: int = 0, **overrides):
    """A tiny model of `family` with random weights (seeded) on `tokenizer`'s vocabulary, in eval mode; `overrides`
    change its config (e.g. num_hidden_layers=4)."""
    import torch
    import transformers

    cls_name, kwargs, head = configs()[family]
    special = {k: v for k, v in (("pad_token_id", tokenizer.pad_token_id), ("bos_token_id", tokenizer.cls_token_id),
                                 ("eos_token_id", tokenizer.sep_token_id)) if v is not None}
    if family == "modernbert":
        special.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), **{**kwargs, **special, **overrides})
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if head == "causal-lm" else transformers.AutoModel
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (Gemma: 0); random ones make the folds' exactness a real check
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if "Norm" in type(mod).__name__ and isinstance(w, torch.nn.Parameter) and w.dim() == 1:
                w.add_(torch.randn_like(w) * 0.1)
    return model.eval()
