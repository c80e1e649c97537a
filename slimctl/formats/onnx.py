"""ONNX artifacts: model.onnx (+ config, tokenizer) run by onnxruntime behind slimctl's model interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError


class Onnx:
    name = "onnx"
    loads_with = "onnxruntime (model.onnx), or slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return meta.get("format") == "onnx"

    def load(self, folder: Path, kind: str, meta: dict[str, Any], safe: bool, trust_remote_code: bool):
        from transformers import AutoConfig

        from .onnxrt import ONNX_FILE, OrtModel

        if not (folder / ONNX_FILE).is_file():
            raise ModelLoadError(f"{folder} is an ONNX artifact (slimctl.json) but has no {ONNX_FILE}")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelLoadError("this artifact is ONNX; install onnxruntime (pip install 'slimctl[onnx]')") from None
        model = OrtModel.from_file(folder / ONNX_FILE, AutoConfig.from_pretrained(folder), kind)
        try:
            model.session()
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own types for a bad graph
            raise ModelLoadError(f"onnxruntime could not load {folder / ONNX_FILE}: {str(e).splitlines()[0][:300]}") from None
        return model

    def holds(self, model) -> bool:
        return getattr(model, "artifact_format", None) == "onnx"

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder)

    def state_bytes(self, model) -> int:
        return model.weight_bytes()

    def bench_meta(self, model) -> dict[str, Any]:
        # CUDA execution provider: some nodes (often int8 ones) may run on the CPU
        return {"backend": "onnxruntime", "onnx_cpu_fallback": model.fallback}
