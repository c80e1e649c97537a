"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's block with fused projections. qkv_proj holds q, k, v rows (by head
counts); gate_up_proj holds the gate rows then the up rows (the MLP computes act(gate) · up)."""
from . import FFN, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    return [
        Fold("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        Fold("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", how="rows", part="v", heads=True),
        Fold("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        Fold("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", how="rows", part="up"),
    ]


register(Family("phi3", ("phi3",), "Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv_proj and gate_up_proj)", _folds,
                ffn=None, attention=None,
                fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
                no_clip=("qkv_proj",)))
