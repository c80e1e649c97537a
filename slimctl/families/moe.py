"""Mixture-of-experts decoders with a Llama attention: Mixtral, Qwen2-MoE (plus a shared expert and its
gate), Qwen3-MoE. transformers 5 keeps each layer's experts as two fused 3-D parameters; slimctl unfuses
them on load into one gate/up/down Linear per expert (`convert.LinearExperts`, same function), so every
Linear technique quantizes or prunes each expert, and calibration sees which tokens each expert gets."""
from . import tiny
from .registry import LLAMA_ATTENTION, Family, Fold, register


def _folds(block, config) -> list[Fold]:
    mlp = block.mlp
    experts = mlp.experts
    n = len(experts) if hasattr(experts, "__len__") else 0
    readers = ["mlp.gate"] + [f"mlp.experts.{i}.{p}" for i in range(n) for p in ("gate_proj", "up_proj")]
    if hasattr(mlp, "shared_expert"):
        readers += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"]
    if hasattr(mlp, "shared_expert_gate"):
        readers.append("mlp.shared_expert_gate")
    out = [Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
           Fold("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", how="rows", heads=True),
           Fold("post_attention_layernorm", tuple(readers), "mlp")]
    out += [Fold(f"mlp.experts.{i}.up_proj", (f"mlp.experts.{i}.down_proj",), f"mlp.experts.{i}.down_proj", how="rows")
            for i in range(n)]
    if hasattr(mlp, "shared_expert"):
        out.append(Fold("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj",
                        how="rows"))
    return out


def _gguf(writer, config) -> None:
    """Expert counts (llama.cpp's TextModel writes them for every MoE) and, for Qwen, the expert and shared
    expert widths (conversion/qwen.py); the experts themselves are stacked per layer by the exporter."""
    writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


# llama.cpp runs Mixtral as its llama architecture with experts (conversion/llama.py)
register(Family("mixtral", ("mixtral",), "Mixtral (top-k experts)", _folds, attention=LLAMA_ATTENTION, experts=True,
                gguf_arch="llama", gguf_meta=_gguf,
                tiny=("MixtralConfig", dict(tiny.MOE), "causal-lm")))
register(Family("qwen2_moe", ("qwen2_moe",), "Qwen1.5/Qwen2-MoE (experts + a gated shared expert)", _folds,
                attention=LLAMA_ATTENTION, experts=True, gguf_arch="qwen2moe", gguf_meta=_gguf,
                tiny=("Qwen2MoeConfig", dict(tiny.LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=128), "causal-lm")))
register(Family("qwen3_moe", ("qwen3_moe",), "Qwen3-MoE (top-k experts, per-head q/k norms)", _folds,
                attention=LLAMA_ATTENTION, experts=True, gguf_arch="qwen3moe", gguf_meta=_gguf,
                tiny=("Qwen3MoeConfig", dict(tiny.LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64), "causal-lm")))
