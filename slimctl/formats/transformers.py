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


def save_as_is(model, folder: Path) -> None:
    """The state dict under its in-memory names (tied copies once) and the config: what slimctl's loader
    reads back after converting the same layers. save_pretrained would rename keys for transformers'
    checkpoint conversions (MoE experts), which do not apply to slimctl's unfused layout."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    state, seen = {}, set()
    for k, t in model.state_dict().items():  # a tied tensor once, under its first name (the input embedding)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        state[k] = t.contiguous()
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def skeleton_and_state(folder: Path, kind: str, swap=lambda model: None):
    """A model built from the folder's config in slimctl's layout (Conv1D as Linear, one Linear per
    expert), FFNs shrunk to per-layer widths, `swap(model)` applied, then the folder's safetensors
    loaded into it: how slimctl reads artifacts whose shapes the config alone does not give."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .ctformat import to_slimctl_state
    from ..errors import ModelLoadError
    from ..families.convert import prepare
    from ..families.layer_sizes import apply_layer_sizes
    from ..kinds import auto_class

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # describes the files, not a quantizer to run here
        del config.quantization_config
    # Built on CPU rather than the meta device so that non-persistent buffers (position ids, rotary
    # frequencies) are computed by the model's own code; the weights are then replaced from disk.
    model = auto_class(kind).from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    prepare(model)
    apply_layer_sizes(model)
    qmeta = swap(model)
    state: dict[str, Any] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    if qmeta:
        state = to_slimctl_state(state, qmeta)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(tied_keys(model))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match its config / slimctl.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model


def tied_keys(model) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


class Transformers:
    name = "transformers"
    loads_with = "transformers"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return True

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        import json

        from ..families.layer_sizes import has_layer_sizes
        from ..kinds import auto_class

        if safe and has_layer_sizes(json.loads((Path(folder) / "config.json").read_text())):
            return skeleton_and_state(folder, kind)  # per-layer FFN widths: slimctl's loader
        return auto_class(kind).from_pretrained(folder, dtype="auto", use_safetensors=safe, trust_remote_code=trust_remote_code)

    def holds(self, model) -> bool:
        return True

    def save(self, model, folder: Path) -> None:
        from ..families.convert import convertible_back, transformers_layout
        from ..families.layer_sizes import has_layer_sizes

        if not convertible_back(model) or has_layer_sizes(model.config):  # quantized experts / Conv1D: slimctl's layout, keys as in memory
            return save_as_is(model, folder)
        with warnings.catch_warnings(), transformers_layout(model):  # Conv1D / fused experts as transformers has them
            warnings.simplefilter("ignore")
            model.save_pretrained(folder, safe_serialization=True)

    def state_bytes(self, model) -> int:
        return dense_state_bytes(model)

    def bench_meta(self, model) -> dict[str, Any]:
        return {}
