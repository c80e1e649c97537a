"""Encoders. BERT, RoBERTa and XLM-R are post-norm (the LayerNorm's output is also the residual, so no norm
fold is exact): value -> attention output folds. DistilBERT likewise with v_lin -> out_lin. ModernBERT is
pre-norm with fused Wqkv and a gated Wi (input rows, then gate rows; the output is act(input) · gate);
its first block has no attention norm."""
from . import tiny
from .registry import FFN, Attention, Family, Fold, register

_POST_NORM = ("LayerNorm -> query/key/value (post-norm: the norm's output is also the residual)",
              "intermediate -> output (a GELU sits between them)")


def _bert(block, config) -> list[Fold]:
    return [Fold("attention.self.value", ("attention.output.dense",), "attention.output.dense", how="rows", heads=True)]


def _distilbert(block, config) -> list[Fold]:
    return [Fold("attention.v_lin", ("attention.out_lin",), "attention.out_lin", how="rows", heads=True)]


def _modernbert(block, config) -> list[Fold]:
    out = [Fold("attn_norm", ("attn.Wqkv",), "attn")] if hasattr(block.attn_norm, "weight") else []
    return out + [Fold("attn.Wqkv", ("attn.Wo",), "attn.Wo", how="rows", part="v", heads=True),
                  Fold("mlp_norm", ("mlp.Wi",), "mlp"),
                  Fold("mlp.Wi", ("mlp.Wo",), "mlp.Wo", how="rows", part="gate")]


_BERT_FFN = FFN(("intermediate.dense",), "output.dense", "intermediate_size")
_BERT_ATTN = Attention("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", resizable=False)
register(Family("bert", ("bert",), "BERT / MiniLM", _bert, no_fold=_POST_NORM, ffn=_BERT_FFN, attention=_BERT_ATTN,
                encoder=True,
                tiny=("BertConfig", dict(tiny.ENC), "encoder")))
register(Family("roberta", ("roberta", "xlm-roberta", "camembert"), "RoBERTa / XLM-R (BERT layout)", _bert,
                no_fold=_POST_NORM, ffn=_BERT_FFN, attention=_BERT_ATTN, encoder=True,
                tiny=("XLMRobertaConfig", dict(tiny.ENC), "encoder")))
register(Family("distilbert", ("distilbert",), "DistilBERT", _distilbert, no_fold=_POST_NORM,
                ffn=FFN(("ffn.lin1",), "ffn.lin2", "hidden_dim"),
                attention=Attention("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", resizable=False),
                no_clip=("q_lin", "k_lin"), encoder=True,
                tiny=("DistilBertConfig", dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=512), "encoder")))
register(Family("modernbert", ("modernbert",), "ModernBERT (pre-norm, fused Wqkv, gated Wi)", _modernbert,
                ffn=FFN(("mlp.Wi",), "mlp.Wo", "intermediate_size", parts=2),
                fused={"attn.Wqkv": ("q", "k", "v"), "mlp.Wi": ("input", "gate")}, no_clip=("Wqkv",), encoder=True,
                tiny=("ModernBertConfig", dict(tiny.ENC, global_attn_every_n_layers=1, local_attention=64), "encoder")))
