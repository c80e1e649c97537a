"""Phi-1/1.5/2: one LayerNorm (with bias) feeds attention and the MLP in parallel; the attention output is
`dense`, the MLP is fc1 -> GELU -> fc2 (no exact fold across the GELU); partial rotary."""
from . import tiny
from .registry import FFN, Attention, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    return [
        Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), ""),
        Fold("self_attn.v_proj", ("self_attn.dense",), "self_attn.dense", how="rows", heads=True),
    ]


register(Family("phi", ("phi",), "Phi-1 / 1.5 / 2 (parallel attention and MLP, LayerNorm with bias)", _folds,
                no_fold=("mlp.fc1 -> mlp.fc2 (a GELU sits between them)",),
                ffn=FFN(("mlp.fc1",), "mlp.fc2", "intermediate_size"),
                attention=Attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
                gguf_arch="phi2",
                tiny=("PhiConfig", dict(tiny.NO_HD, partial_rotary_factor=0.5), "causal-lm")))
