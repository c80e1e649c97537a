"""Plain transformers folders: config.json + safetensors (or, when allowed, pickle) weights."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def dense_state_bytes(model) -> int:
    """Bytes of a torch model's weights as they are stored, counting shared (tied) tensors once."""
    import torch

    seen: set[int] = set()
    total = 0
    todo = list(model.state_dict().values())
    while todo:
        t = todo.pop()
        if hasattr(t, "__tensor_flatten__") and not isinstance(t, torch.nn.Parameter) and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()  # a wrapper (2:4 semi-structured): count the tensors it holds
            todo += [getattr(t, n) for n in names if getattr(t, n, None) is not None]
            continue
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class Transformers:
    name = "transformers"
    loads_with = "transformers"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return True

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        from ..kinds import auto_class

        return auto_class(kind).from_pretrained(folder, dtype="auto", use_safetensors=safe, trust_remote_code=trust_remote_code)

    def holds(self, model) -> bool:
        return True

    def save(self, model, folder: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder, safe_serialization=True)

    def state_bytes(self, model) -> int:
        return dense_state_bytes(model)

    def bench_meta(self, model) -> dict[str, Any]:
        return {}
