"""Accuracy of a model, alone or side by side with its reference: perplexity, embedding fidelity,
topic and classification accuracy, and top-1 agreement / KL divergence against the reference.

The measurement itself is in evaluation.py."""
from __future__ import annotations

from .evaluation import (
    Track, DEFAULTS, ENCODER_TRAIN_PER_TOPIC, BATCH, FEW_TOKENS, Evaluation,
    settings_for, evaluate, prepare_tasks, perplexity_windows, bos_prefix, window_input,
    score_windows, evaluate_model,
)

__all__ = ["Track", "DEFAULTS", "ENCODER_TRAIN_PER_TOPIC", "BATCH", "FEW_TOKENS", "Evaluation", "settings_for",
           "evaluate", "prepare_tasks", "perplexity_windows", "bos_prefix", "window_input", "score_windows",
           "evaluate_model"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, "evaluate_model")  # slimctl.evaluate(...) is the API function
