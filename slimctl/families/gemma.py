"""Gemma 1/2/3: RMSNorms compute x̂ · (1 + w); Gemma 2/3 add norms after attention and around the MLP,
and the MLP reads `pre_feedforward_layernorm`, not `post_attention_layernorm` (that one normalises the
attention output before the residual add, so it feeds no Linear)."""
from functools import partial

from . import tiny
from .registry import LLAMA_ATTENTION, LLAMA_FFN, Family, llama_folds, register


def _gemma2_gguf(writer, config) -> None:
    """As llama.cpp's converter (conversion/gemma.py): both soft-caps and the sliding window; norms + 1."""
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _gemma3_gguf(writer, config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "sliding_window_pattern", None) != 1:
        writer.add_sliding_window(config.sliding_window)


register(Family("gemma", ("gemma",), "Gemma (1 + w norms)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0, gguf_arch="gemma",
                tiny=("GemmaConfig", dict(tiny.LM), "causal-lm")))
_sandwich = partial(llama_folds, norm_mlp="pre_feedforward_layernorm")
register(Family("gemma2", ("gemma2",), "Gemma 2 (1 + w norms, pre/post norms around attention and MLP)", _sandwich,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0, gguf_arch="gemma2", gguf_meta=_gemma2_gguf,
                tiny=("Gemma2Config", dict(tiny.LM, query_pre_attn_scalar=16, sliding_window=256), "causal-lm")))
register(Family("gemma3", ("gemma3_text", "gemma3"), "Gemma 3 text (as Gemma 2, plus per-head q/k norms)", _sandwich,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0, gguf_arch="gemma3", gguf_meta=_gemma3_gguf,
                tiny=("Gemma3TextConfig", dict(tiny.LM, query_pre_attn_scalar=16, sliding_window=256), "causal-lm")))
