"""slimctl's quantized modules (weight-only int4/int8, W8A8, int8 dynamic, FP8): rebuilt from the
artifact's slimctl.json. Symmetric weight-only artifacts are written in the compressed-tensors
pack-quantized layout, which plain transformers also loads; the rest keep slimctl's own layout."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .transformers import Transformers


def tied_keys(model) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


class Native(Transformers):
    name = "slimctl"
    loads_with = "slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return bool(meta.get("quantized_modules"))

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        """Skeleton from config, quantized modules swapped in from slimctl.json, weights loaded."""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig

        from ..ctformat import to_slimctl_state
        from ..families.convert import prepare
        from ..kinds import auto_class
        from ..qmodules import build_from_meta

        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config"):  # describes the files, not a quantizer to run here
            del config.quantization_config
        # Built on CPU rather than the meta device so that non-persistent buffers (position ids, rotary
        # frequencies) are computed by the model's own code; the weights are then replaced from disk.
        model = auto_class(kind).from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        prepare(model)  # the layout the artifact was quantized in (Conv1D as Linear, one Linear per expert)
        build_from_meta(model, meta["quantized_modules"])
        state: dict[str, Any] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
        state = to_slimctl_state(state, meta["quantized_modules"])
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = set(tied_keys(model))
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ModelLoadError(f"{folder}: weights do not match its slimctl.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
        return model

    def holds(self, model) -> bool:
        from ..qmodules import quantized_modules_meta

        return bool(quantized_modules_meta(model))


class CompressedTensors(Native):
    name = "compressed-tensors"
    loads_with = "transformers + compressed-tensors, or slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        qc = config.get("quantization_config") or {}
        return bool(meta.get("quantized_modules")) and qc.get("quant_method") == "compressed-tensors"

    def holds(self, model) -> bool:
        from ..ctformat import exportable

        return exportable(model)

    def save(self, model, folder: Path) -> None:
        from ..ctformat import rewrite_folder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder, safe_serialization=True)
        rewrite_folder(model, folder)  # weight-only int4/int8 layers in the compressed-tensors layout
