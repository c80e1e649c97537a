"""ONNX: export a transformers model with torch.onnx.export, quantize it with onnxruntime
(dynamic int8, or static int8 QDQ from calibration data), and run it through `OrtModel`, an
onnxruntime-backed stand-in that eval, bench, save and reload treat like any other model."""
from __future__ import annotations

import io
import re
import logging
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DeviceError, UnsupportedError
from ..kinds import CAUSAL_LM, ENCODER

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")


class _Export(nn.Module):
    """The graph to export: token ids and mask in, one tensor out, no cache."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids, attention_mask):
        if self.kind == CAUSAL_LM:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if self.kind == ENCODER else out.logits


def output_name(kind: str) -> str:
    return "last_hidden_state" if kind == ENCODER else "logits"


def export(model: nn.Module, kind: str, path: Path, opset: int = 18) -> None:
    """Write `model` as a single-file ONNX graph with dynamic batch and sequence axes."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter needs it)
    except ImportError:
        raise UnsupportedError("ONNX export needs the onnx extra: pip install 'slimctl[onnx]'") from None
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise UnsupportedError("ONNX export starts from float32 weights; put no cast or quantization step before it")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 2017]] * 2)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    noise = io.StringIO()
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and the like
    with warnings.catch_warnings(), redirect_stdout(noise), redirect_stderr(noise):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_Export(model, kind).eval(), (ids, torch.ones_like(ids)), str(path), input_names=list(INPUTS),
                              output_names=[output_name(kind)], dynamic_shapes=dyn, dynamo=True, opset_version=opset,
                              external_data=False)
        except Exception as e:  # noqa: BLE001  the exporter raises many types; all mean "this model does not export"
            first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
            raise UnsupportedError(f"torch.onnx.export could not export this model ({type(e).__name__}: {first})") from None
        finally:
            log.setLevel(level)


def check_export(model: nn.Module, kind: str, path: Path) -> float:
    """Run the float graph on a probe of another shape than the traced one and compare it with the model:
    a graph that computes something else is refused, not quantized and shipped. Returns max |Δ| / max |ref|."""
    import onnxruntime as ort

    ids = torch.tensor([[101, 7592, 2088, 2003, 2019, 2742, 1997, 102, 2000, 2001, 2013]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ref = _Export(model, kind).eval()(ids, mask).float()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]).float()
    rel = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    if rel > 1e-3:
        raise UnsupportedError(f"the exported ONNX graph does not compute what {type(model).__name__} computes "
                               f"(max |Δ| {rel:.3g} of the largest output on a probe); its ONNX export is not supported")
    return rel


def quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic as qd

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        qd(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])


def quantize_static(src: Path, dst: Path, batches: list[dict[str, torch.Tensor]], method: str = "MinMax",
                    keep_ffn_down_float: bool = True) -> int:
    """int8 QDQ: weights per channel (symmetric), activations per tensor (asymmetric, ranges from the
    calibration batches). Attention's activation×activation MatMuls stay float, and by default so do
    the FFN down projections, whose post-activation inputs carry the outliers (measured on
    minilm-l6: mean cosine 0.84 with everything int8 and symmetric activations, 0.94 asymmetric,
    0.995 asymmetric with the FFN down projection in float). Returns how many MatMuls stayed float."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static as qs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: b[k].numpy() for k in INPUTS} for b in batches])

        def get_next(self):
            return next(self.it, None)

    exclude = activation_matmuls(src) + (ffn_down_matmuls(src) if keep_ffn_down_float else [])
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
        qs(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
           nodes_to_exclude=exclude, calibrate_method=getattr(CalibrationMethod, method))
    return len(exclude)


def _graph(path: Path):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return g, consts, {o: n for n in g.node for o in n.output}


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant operand (attention's QKᵀ and AV)."""
    g, consts, _ = _graph(path)
    return [n.name for n in g.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


_ACTIVATIONS = {"Erf", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Relu", "Softplus", "HardSigmoid"}


def ffn_down_matmuls(path: Path, hops: int = 4) -> list[str]:
    """Weight MatMuls whose input comes from an activation function within a few nodes (GELU as
    x·½(1+erf(x/√2)), SiLU(gate)·up): the FFN down projections."""
    g, consts, producer = _graph(path)

    def near_activation(name: str, depth: int) -> bool:
        n = producer.get(name)
        if n is None:
            return False
        if n.op_type in _ACTIVATIONS:
            return True
        return depth > 1 and any(near_activation(i, depth - 1) for i in n.input if i not in consts)

    return [n.name for n in g.node if n.op_type == "MatMul" and any(i in consts for i in n.input)
            and near_activation(n.input[0], hops)]


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("--device cuda with an ONNX artifact needs onnxruntime-gpu (the CUDA execution provider); "
                              "this onnxruntime has only " + ", ".join(ort.get_available_providers()))
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cpu_fallback(path: str, device: str) -> bool | None:
    """On CUDA: does any node of the graph run on the CPU (int8 ops often do)? None on CPU."""
    if device != "cuda":
        return None
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(path, so, providers=["CUDAExecutionProvider"])
        return False
    except Exception:  # noqa: BLE001  refused: some node has no CUDA kernel
        return True


class _SeqCache:
    """What an OrtModel hands back as past_key_values: the ids so far (the graph has no KV cache)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids


class OrtModel(nn.Module):
    """A model.onnx run by onnxruntime behind the interface slimctl uses of a transformers model:
    model(input_ids=…, attention_mask=…) → .logits / .last_hidden_state, .config, save_pretrained.
    The exported graph has no KV cache: a decode step re-runs the whole sequence, as a user of this
    graph would, and the bench measures exactly that."""

    supports_kv_cache = False
    artifact_format = "onnx"

    def __init__(self, onnx_bytes: bytes, config, kind: str, device: str = "cpu"):
        super().__init__()
        self.onnx_bytes, self.config, self.kind, self.device_name = onnx_bytes, config, kind, device
        self._session = None
        self.fallback: bool | None = None

    @classmethod
    def from_file(cls, path: Path, config, kind: str) -> "OrtModel":
        return cls(Path(path).read_bytes(), config, kind)

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()  # the same threads torch gets: a fair comparison
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            self._session = ort.InferenceSession(self.onnx_bytes, so, providers=providers(self.device_name))
        return self._session

    def to(self, *args, **kwargs):  # bench moves models with .to("cuda"): pick the execution provider instead
        dev = args[0] if args else kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            self.device_name, self._session = "cuda", None
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / ONNX_FILE
                p.write_bytes(self.onnx_bytes)
                self.fallback = cpu_fallback(str(p), "cuda")
        return self

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, use_cache=None, logits_to_keep=None,
                token_type_ids=None, **unused):
        past_key_values = cache if cache is not None else past_key_values
        if isinstance(past_key_values, _SeqCache):
            input_ids = torch.cat([past_key_values.ids, input_ids.to(past_key_values.ids.device)], dim=1)
        if attention_mask is None or attention_mask.shape != input_ids.shape:
            attention_mask = torch.ones_like(input_ids)
        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        out = torch.from_numpy(self.session().run(None, feed)[0])
        from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, SequenceClassifierOutput

        if self.kind == CAUSAL_LM:
            if past_key_values is not None or logits_to_keep:
                out = out[:, -1:]
            field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
            return CausalLMOutputWithPast(logits=out, **{field: _SeqCache(input_ids) if use_cache else None})
        if self.kind == ENCODER:
            return BaseModelOutput(last_hidden_state=out)
        return SequenceClassifierOutput(logits=out)

    def save_pretrained(self, folder, **unused) -> None:
        folder = Path(folder)
        (folder / ONNX_FILE).write_bytes(self.onnx_bytes)
        self.config.save_pretrained(folder)

    def weight_bytes(self) -> int:
        return len(self.onnx_bytes)

    def extra_repr(self) -> str:
        return f"{ONNX_FILE}, {len(self.onnx_bytes) / 2**20:.1f} MB, {self.kind}"


def op_counts(onnx_bytes: bytes) -> dict[str, int]:
    """How many nodes of each quantization-related op type the graph has."""
    import onnx

    g = onnx.load_from_string(onnx_bytes).graph
    counts: dict[str, int] = {}
    for n in g.node:
        if n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Gemm"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def env_summary() -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cpu_count": os.cpu_count()}
