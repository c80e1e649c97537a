"""slimctl's quantized modules (weight-only int4/int8, W8A8, int8 dynamic, FP8): rebuilt from the
artifact's slimctl.json. Symmetric weight-only artifacts are written in the compressed-tensors
pack-quantized layout, which plain transformers also loads; the rest keep slimctl's own layout."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .transformers import Transformers, skeleton_and_state


class Native(Transformers):
    name = "slimctl"
    loads_with = "slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return bool(meta.get("quantized_modules"))

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        """Skeleton from config, quantized modules swapped in from slimctl.json, weights loaded."""
        from ..quant.layers import build_from_meta

        def swap(model):
            build_from_meta(model, meta["quantized_modules"])
            return meta["quantized_modules"]

        return skeleton_and_state(folder, kind, swap)

    def holds(self, model) -> bool:
        from ..quant.layers import quantized_modules_meta

        return bool(quantized_modules_meta(model))


class CompressedTensors(Native):
    name = "compressed-tensors"
    loads_with = "transformers + compressed-tensors, or slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        qc = config.get("quantization_config") or {}
        return bool(meta.get("quantized_modules")) and qc.get("quant_method") == "compressed-tensors"

    def holds(self, model) -> bool:
        from .ctformat import exportable

        return exportable(model)

    def save(self, model, folder: Path) -> None:
        from .ctformat import rewrite_folder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder, safe_serialization=True)
        rewrite_folder(model, folder)  # weight-only int4/int8 layers in the compressed-tensors layout
