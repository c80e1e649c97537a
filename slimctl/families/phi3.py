"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's block with fused projections. qkv_proj holds q, k, v rows (by head
counts); gate_up_proj holds the gate rows then the up rows (the MLP computes act(gate) · up)."""
from . import tiny
from .registry import FFN, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    return [
        Fold("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        Fold("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", how="rows", part="v", heads=True),
        Fold("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        Fold("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", how="rows", part="up"),
    ]


def _gguf(writer, config) -> None:
    """As llama.cpp's converter (conversion/phi.py): the original context and the sliding window (0: none)."""
    rope = getattr(config, "rope_parameters", None) or {}
    orig = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    writer.add_rope_scaling_orig_ctx_len(orig or config.max_position_embeddings)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


register(Family("phi3", ("phi3",), "Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv_proj and gate_up_proj)", _folds,
                ffn=FFN(("mlp.gate_up_proj",), "mlp.down_proj", "intermediate_size", parts=2), attention=None,
                fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
                no_clip=("qkv_proj",), gguf_arch="phi3", gguf_meta=_gguf,
                tiny=("Phi3Config", dict(tiny.NO_HD), "causal-lm")))
