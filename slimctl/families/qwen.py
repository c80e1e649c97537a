"""Qwen2/Qwen2.5 (q/k/v with biases) and Qwen3 (per-head q/k RMSNorm): Llama's layout."""
from . import tiny
from .registry import LLAMA_ATTENTION, LLAMA_FFN, Family, llama_folds, register

register(Family("qwen2", ("qwen2",), "Qwen2 / Qwen2.5 (biases on q/k/v)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="qwen2",
                tiny=("Qwen2Config", dict(tiny.LM), "causal-lm")))
# q_norm/k_norm act per head after q_proj/k_proj: they do not sit between the input norm and the
# projections, so the input-norm fold stays exact.
register(Family("qwen3", ("qwen3",), "Qwen3 (per-head q/k norms)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="qwen3",
                tiny=("Qwen3Config", dict(tiny.LM), "causal-lm")))
