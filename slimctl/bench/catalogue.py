"""Config-only architectures: the built-in catalogue of model shapes a bench can build with random weights
(no download), and reading a parameter count from a config."""
from __future__ import annotations

from pathlib import Path
from typing import Any


# Architectures for `bench --config NAME`: shapes of public models, weights random (speed and memory only).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                 "rms_norm_eps": 1e-5},
    "llama-8b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
                 "rms_norm_eps": 1e-5},
    "smollm2-1.7b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "max_position_embeddings": 8192, "rope_theta": 130000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
}


def config_folder(spec: str, into) -> "Path":
    """A folder holding only config.json, from a built-in architecture name or a config.json path."""
    import json
    from pathlib import Path

    from ..errors import ModelLoadError

    if spec in ARCHITECTURES:
        cfg = ARCHITECTURES[spec]
    else:
        p = Path(spec)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ModelLoadError(f"--config {spec} is neither a config.json nor a built-in architecture "
                                 f"({', '.join(ARCHITECTURES)})")
        try:
            cfg = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"--config {p} is not valid JSON") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ModelLoadError(f"--config {p} has no model_type; it is not a transformers config")
    folder = Path(into) / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def params_from_config(folder) -> int | None:
    """Parameter count of a config-only model, without building it (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001  only informative
        return None
