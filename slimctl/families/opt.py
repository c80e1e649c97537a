"""OPT: pre-norm blocks (for every size but 350m, whose `do_layer_norm_before` is false: then the norms act
after the residual add and no norm fold is exact); fc1 -> ReLU -> fc2; out_proj."""
from .registry import FFN, Attention, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    v_o = [Fold("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", how="rows", heads=True)]
    if not getattr(config, "do_layer_norm_before", True):
        return v_o
    return [Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            *v_o, Fold("final_layer_norm", ("fc1",), "fc1")]


register(Family("opt", ("opt",), "OPT (pre-norm; fc1/fc2 with ReLU)", _folds,
                no_fold=("fc1 -> fc2 (a ReLU sits between them)",),
                ffn=FFN(("fc1",), "fc2", "ffn_dim"),
                attention=Attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", resizable=False),
                tiny=("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=512), "causal-lm")))
