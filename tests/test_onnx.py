"""ONNX path: export matches torch, dynamic and static int8 stay close, the artifact runs in plain
onnxruntime and reloads bitwise, and the bench measures it with the onnxruntime backend."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from slimctl.formats import onnxrt
from slimctl import techniques as T  # noqa: E402
from slimctl.errors import UnsupportedError  # noqa: E402
from slimctl.models import load  # noqa: E402

CAL = {"calib_samples": 6, "calib_seq_len": 32}
IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 2017, 2024, 1037], [101, 2178, 6251, 102, 0, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def _apply(m, **opts):
    t = T.get("onnx")
    ctx = T.StepContext(kind=m.kind, tokenizer=m.tokenizer)
    stats = t.apply(m.model, t.config(**opts), ctx)
    return ctx.replacement, stats


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert", "tiny_classifier"])
def test_fp32_export_matches_torch(fixture, request):
    m = load(str(request.getfixturevalue(fixture)))
    ort_model, stats = _apply(m, quantization="none")
    with torch.inference_mode():
        ref, got = m.model(input_ids=IDS, attention_mask=MASK), ort_model(input_ids=IDS, attention_mask=MASK)
    key = "last_hidden_state" if m.kind == "encoder" else "logits"
    a, b = getattr(ref, key), getattr(got, key)
    valid = MASK.bool() if a.dim() == 3 else torch.ones(a.shape[0], dtype=torch.bool)
    assert torch.allclose(a[valid], b[valid], atol=1e-4), (a - b).abs().max()
    assert stats["ops"].get("MatMulInteger", 0) == 0


@pytest.mark.parametrize("quantization,op", [("dynamic", "MatMulInteger"), ("static", "QuantizeLinear")])
def test_int8_graphs_hold_int8_ops_and_stay_close(tiny_bert, quantization, op):
    m = load(str(tiny_bert))
    ort_model, stats = _apply(m, quantization=quantization, **CAL)
    assert stats["ops"].get(op, 0) > 0
    assert stats["onnx_mb"] < stats["onnx_fp32_mb"]
    with torch.inference_mode():
        a = m.model(input_ids=IDS, attention_mask=MASK).last_hidden_state[0].mean(0)
        b = ort_model(input_ids=IDS, attention_mask=MASK).last_hidden_state[0].mean(0)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95


def test_static_leaves_attention_and_ffn_down_matmuls_float(tiny_llama, tmp_path):
    m = load(str(tiny_llama))
    onnxrt.export(m.model, m.kind, tmp_path / "f.onnx")
    act, down = onnxrt.activation_matmuls(tmp_path / "f.onnx"), onnxrt.ffn_down_matmuls(tmp_path / "f.onnx")
    layers = m.model.config.num_hidden_layers
    assert len(down) == layers  # one down_proj per layer: found through SiLU's Sigmoid
    assert not set(act) & set(down)


def test_export_refuses_non_fp32(tiny_llama):
    m = load(str(tiny_llama))
    m.model.to(torch.bfloat16)
    with pytest.raises(UnsupportedError, match="float32"):
        _apply(m, quantization="dynamic")


def test_decode_without_kv_cache_reruns_the_sequence(tiny_llama):
    m = load(str(tiny_llama))
    ort_model, _ = _apply(m, quantization="none")
    ids = IDS[:1, :6]
    with torch.inference_mode():
        first = ort_model(input_ids=ids, use_cache=True)
        nxt = first.logits[:, -1:].argmax(-1)
        from slimctl.bench import cache_of

        step = ort_model(input_ids=nxt, past_key_values=cache_of(first), use_cache=True)
        full = m.model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1:]
    assert step.logits.shape == (1, 1, m.model.config.vocab_size)
    assert torch.allclose(step.logits, full, atol=1e-4)


_PLAIN = """
import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"])
ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
print(json.dumps(s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].flatten().tolist()))
"""


def test_run_writes_an_onnx_artifact_that_plain_onnxruntime_runs(tiny_llama, tmp_path, fast_recipe):
    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    rep = pipeline.run(R.load(fast_recipe([{"method": "onnx", "quantization": "dynamic"}])), str(tiny_llama),
                       tmp_path / "o", isolate=True)
    art = tmp_path / "o" / "model"
    assert (art / "model.onnx").is_file() and not list(art.glob("*.safetensors"))
    assert rep["artifact"]["reload_check"]["bitwise_equal"] is True
    assert rep["slimmed"]["bench"]["backend"] == "onnxruntime" and rep["slimmed"]["bench"]["decode_tokens_per_s"] > 0
    assert "onnxruntime" in rep["artifact"]["loads_with"]
    out = subprocess.run([sys.executable, "-c", _PLAIN, str(art)], capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(out.stdout))
    again = load(str(art))
    with torch.inference_mode():
        mine = again.model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).logits.flatten()
    assert torch.equal(theirs, mine)
