"""What kind of model a folder holds (causal LM, encoder, sequence classifier), read from its config;
the kind decides eval and bench defaults and which transformers Auto class builds it."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import ModelLoadError


class TaskKind(str, Enum):
    """Compares, prints and serialises as its value ("causal-lm")."""
    __str__ = str.__str__
    __format__ = str.__format__

    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"
    SEQ_CLS = "seq-cls"


CAUSAL_LM, ENCODER, SEQ_CLS = TaskKind.CAUSAL_LM, TaskKind.ENCODER, TaskKind.SEQ_CLS
TASK_KINDS = tuple(TaskKind)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model folder; a missing or malformed one is a ModelLoadError."""
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON ({e.__class__.__name__}: line {getattr(e, 'lineno', '?')})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{cfg} has no model_type; is it a Hugging Face model config?")
    return data


def detect_kind(config: dict[str, Any]) -> TaskKind:
    """Task kind from the config: it decides the eval and bench defaults."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if config.get("is_encoder_decoder"):
        raise ModelLoadError(f"encoder-decoder models ({config.get('model_type')}) are not supported yet")
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if arch.endswith("ForSequenceClassification"):
        return SEQ_CLS
    if arch.endswith("Model") or not arch:
        return ENCODER
    raise ModelLoadError(f"architecture {arch} is not supported (causal LM, encoder, or sequence classifier)")


def reload_mismatch(model, kind: str, prepare=None) -> list:
    """What a model of this kind built from `model.config` (on the meta device; then `prepare(fresh)`, e.g. slimctl's
    per-layer widths) would hold with other shapes than `model` does: the first two differing (name, shape) pairs,
    empty when it reloads as is."""
    import torch

    with torch.device("meta"):
        fresh = auto_class(kind).from_config(model.config)
        if prepare is not None:
            prepare(fresh)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return sorted(set(want.items()) ^ set(have.items()))[:2]


def auto_class(kind: str):
    """The transformers Auto class that builds a model of this kind."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification, ENCODER: AutoModel}[kind]
