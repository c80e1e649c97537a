"""Gemma 1/2/3: RMSNorms compute x̂ · (1 + w); Gemma 2/3 add norms after attention and around the MLP,
and the MLP reads `pre_feedforward_layernorm`, not `post_attention_layernorm` (that one normalises the
attention output before the residual add, so it feeds no Linear)."""
from functools import partial

from . import LLAMA_ATTENTION, LLAMA_FFN, Family, llama_folds, register

register(Family("gemma", ("gemma",), "Gemma (1 + w norms)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0))
_sandwich = partial(llama_folds, norm_mlp="pre_feedforward_layernorm")
register(Family("gemma2", ("gemma2",), "Gemma 2 (1 + w norms, pre/post norms around attention and MLP)", _sandwich,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0))
register(Family("gemma3", ("gemma3_text", "gemma3"), "Gemma 3 text (as Gemma 2, plus per-head q/k norms)", _sandwich,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, norm_offset=1.0))
