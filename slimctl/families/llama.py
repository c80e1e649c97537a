"""Llama-shaped decoders: RMSNorm -> q/k/v, v -> o, RMSNorm -> gate/up, up -> down (SwiGLU)."""
from . import LLAMA_ATTENTION, LLAMA_FFN, Family, llama_folds, register

register(Family("llama", ("llama",), "Llama / SmolLM / TinyLlama", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="llama"))
register(Family("mistral", ("mistral",), "Mistral (sliding-window attention, Llama layout)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION, gguf_arch="llama"))
# Granite scales embeddings, residuals, attention and logits by config multipliers; the layout is Llama's.
register(Family("granite", ("granite",), "IBM Granite 3 (Llama layout with multipliers)", llama_folds,
                ffn=LLAMA_FFN, attention=LLAMA_ATTENTION))
