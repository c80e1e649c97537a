"""Tiny random-weight models of each registered family's real transformers architecture (hidden 64, two
blocks), for the family x method test matrix and scripts/bench_families.py. One row per family."""
from __future__ import annotations

from typing import Any

_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, head_dim=16)
_NO_HD = {k: v for k, v in _LM.items() if k != "head_dim"}  # families that derive the head size
_MOE = dict(_LM, num_local_experts=4, num_experts_per_tok=2)
_ENC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)

# family -> (transformers config class, its keyword arguments, task head: "causal-lm" or "encoder")
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", dict(_LM, tie_word_embeddings=True), "causal-lm"),
    "mistral": ("MistralConfig", dict(_LM, sliding_window=256), "causal-lm"),
    "granite": ("GraniteConfig", dict(_LM, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0), "causal-lm"),
    "qwen2": ("Qwen2Config", dict(_LM), "causal-lm"),
    "qwen3": ("Qwen3Config", dict(_LM), "causal-lm"),
    "gemma": ("GemmaConfig", dict(_LM), "causal-lm"),
    "gemma2": ("Gemma2Config", dict(_LM, query_pre_attn_scalar=16, sliding_window=256), "causal-lm"),
    "gemma3": ("Gemma3TextConfig", dict(_LM, query_pre_attn_scalar=16, sliding_window=256), "causal-lm"),
    "phi3": ("Phi3Config", dict(_NO_HD), "causal-lm"),
    "phi": ("PhiConfig", dict(_NO_HD, partial_rotary_factor=0.5), "causal-lm"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), "causal-lm"),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=512), "causal-lm"),
    "mixtral": ("MixtralConfig", dict(_MOE), "causal-lm"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=128), "causal-lm"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64), "causal-lm"),
    "bert": ("BertConfig", dict(_ENC), "encoder"),
    "roberta": ("XLMRobertaConfig", dict(_ENC), "encoder"),
    "distilbert": ("DistilBertConfig", dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=512), "encoder"),
    "modernbert": ("ModernBertConfig", dict(_ENC, global_attn_every_n_layers=1, local_attention=64), "encoder"),
}


def build(family: str, tokenizer, seed: int = 0):
    """A tiny model of `family` with random weights (seeded) on `tokenizer`'s vocabulary, in eval mode."""
    import torch
    import transformers

    cls_name, kwargs, head = CONFIGS[family]
    special = {k: v for k, v in (("pad_token_id", tokenizer.pad_token_id), ("bos_token_id", tokenizer.cls_token_id),
                                 ("eos_token_id", tokenizer.sep_token_id)) if v is not None}
    if family == "modernbert":
        special.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), **kwargs, **special)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if head == "causal-lm" else transformers.AutoModel
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (Gemma: 0); random ones make the folds' exactness a real check
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if "Norm" in type(mod).__name__ and isinstance(w, torch.nn.Parameter) and w.dim() == 1:
                w.add_(torch.randn_like(w) * 0.1)
    return model.eval()
