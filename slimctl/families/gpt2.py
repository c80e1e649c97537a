"""GPT-2 (and DistilGPT-2): transposed Conv1D layers, which slimctl turns into nn.Linear on load and back on
save (so every Linear technique sees them); c_attn holds q, k, v; LayerNorms with bias."""
from .registry import FFN, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    return [
        Fold("ln_1", ("attn.c_attn",), "attn"),
        Fold("attn.c_attn", ("attn.c_proj",), "attn.c_proj", how="rows", part="v", heads=True),
        Fold("ln_2", ("mlp.c_fc",), "mlp"),
    ]


register(Family("gpt2", ("gpt2",), "GPT-2 / DistilGPT-2 (Conv1D, fused c_attn)", _folds,
                no_fold=("mlp.c_fc -> mlp.c_proj (a GELU sits between them)",),
                ffn=FFN(("mlp.c_fc",), "mlp.c_proj", "n_inner"),
                fused={"attn.c_attn": ("q", "k", "v")}, no_clip=("c_attn",), conv1d=True,
                gguf_arch="gpt2",
                tiny=("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), "causal-lm")))
