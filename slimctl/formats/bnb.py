"""bitsandbytes NF4/FP4/LLM.int8 models: transformers writes and reads them itself (quantization_config
in config.json), so only detection differs from plain transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .transformers import Transformers


class BitsAndBytes(Transformers):
    name = "bitsandbytes"
    loads_with = "transformers"  # with bitsandbytes installed

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"

    def holds(self, model) -> bool:
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        return str(getattr(method, "value", method)) == "bitsandbytes"
