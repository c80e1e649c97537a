"""Llama-shaped decoders: RMSNorm -> q/k/v, v -> o, RMSNorm -> gate/up, up -> down (SwiGLU)."""
from . import tiny
from .registry import LLAMA_ATTENTION, LLAMA_FFN, Family, llama_folds, register

register(Family("llama", ("llama",), "Llama / SmolLM / TinyLlama", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="llama",
                tiny=("LlamaConfig", dict(tiny.LM, tie_word_embeddings=True), "causal-lm")))
register(Family("mistral", ("mistral",), "Mistral (sliding-window attention, Llama layout)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="llama",
                tiny=("MistralConfig", dict(tiny.LM, sliding_window=256), "causal-lm")))


def _granite_gguf(writer, config) -> None:
    """llama.cpp's converter (conversion/granite.py) writes the multipliers as scales."""
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_logit_scale(config.logits_scaling)


# Granite scales embeddings, residuals, attention and logits by config multipliers; the layout is Llama's.
register(Family("granite", ("granite",), "IBM Granite 3 (Llama layout with multipliers)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="granite", gguf_meta=_granite_gguf,
                tiny=("GraniteConfig", dict(tiny.LM, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0), "causal-lm")))
