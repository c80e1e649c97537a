"""ONNX Runtime int8: export with torch.onnx.export, then onnxruntime's dynamic int8 (weights per
channel, activations quantized at run time) or static int8 QDQ (activation ranges from calibration
data); the artifact is model.onnx, run by plain onnxruntime."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from .calibrate import summary
from .registry import CalibrationOptions, Proposal, StepContext, register


class OnnxConfig(CalibrationOptions):
    quantization: Literal["none", "dynamic", "static"] = "dynamic"  # none: the fp32 graph, for comparison
    opset: int = Field(default=18, ge=17, le=23)
    keep_ffn_down_float: bool = True  # static: leave the FFN down projections (outlier inputs) in float
    calibration_method: Literal["MinMax", "Percentile", "Entropy"] = "MinMax"  # static: activation ranges


@register("onnx", "quantize", OnnxConfig,
          "export to ONNX; onnxruntime int8 dynamic or static (QDQ, calibrated), or fp32; model.onnx runs in plain onnxruntime",
          loads_with="onnxruntime", proposals=(Proposal("onnx-int8-dynamic", {"quantization": "dynamic"}, order=60),))
def apply(model, cfg: OnnxConfig, ctx: StepContext) -> dict:
    from .. import families
    from ..formats import onnxrt
    from ..errors import UnsupportedError
    from ..kinds import CAUSAL_LM

    fam = families.of(model)
    if fam is not None and fam.experts:  # said before torch.export's multi-page trace error
        raise UnsupportedError(f"ONNX export of mixture-of-experts blocks is not supported (family '{fam.name}': the "
                               "router's data-dependent choice of experts does not trace to a static graph)")

    if ctx.kind == CAUSAL_LM:  # said at once, in the report's warnings: the graph is for encoders
        ctx.notes.append("ONNX Runtime here is for encoders: the exported causal-LM graph has no KV cache, so every "
                         "decode step re-runs the whole sequence (smollm2-135m decode 0.23-0.28x of fp32); for "
                         "causal LMs use int8-weight-only or int4 (fused kernels) and bench.compile")

    with tempfile.TemporaryDirectory(prefix="slimctl-onnx-") as d:
        fp32 = Path(d) / "fp32.onnx"
        ctx.progress("exporting with torch.onnx.export")
        t0 = time.perf_counter()
        onnxrt.export(model, ctx.kind, fp32, cfg.opset)
        export_s = time.perf_counter() - t0
        export_error = onnxrt.check_export(model, ctx.kind, fp32)
        final, calib = fp32, None
        if cfg.quantization == "dynamic":
            final = Path(d) / "int8.onnx"
            onnxrt.quantize_dynamic(fp32, final)
        elif cfg.quantization == "static":
            batches = cfg.batches(ctx)
            ctx.progress(f"calibrating activation ranges on {len(batches)} texts")
            final = Path(d) / "int8.onnx"
            kept = onnxrt.quantize_static(fp32, final, batches, cfg.calibration_method, cfg.keep_ffn_down_float)
            calib = {**summary(batches), "float_matmuls": kept}
        data = final.read_bytes()
        fp32_mb = fp32.stat().st_size / 2**20
    ctx.replacement = onnxrt.OrtModel(data, model.config, ctx.kind)
    return {"quantization": cfg.quantization, "opset": cfg.opset, "export_seconds": round(export_s, 1),
            "export_max_rel_error": export_error,
            "onnx_fp32_mb": round(fp32_mb, 2), "onnx_mb": round(len(data) / 2**20, 2), "ops": onnxrt.op_counts(data),
            **({"calibration": calib} if calib else {}),
            "note": "the graph has no KV cache: each decode step re-runs the whole sequence"}
