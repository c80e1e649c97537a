"""Quantization math and the calibrated methods (GPTQ, SmoothQuant) on small tensors and tiny models."""
import copy

import pytest
import torch

from slimctl.quant import integer as Q
from slimctl import techniques as T
from slimctl.errors import UnsupportedError
from slimctl.models import load
from slimctl.quant.layers import WeightOnlyLinear, bits_per_weight
from slimctl.techniques.gptq import gptq_quantize


@pytest.mark.parametrize("sym", [True, False])
def test_int4_pack_roundtrip(sym):
    scheme = Q.QScheme(4, 8, sym)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (5, 16)).float()
    packed = Q.pack_int4(codes, scheme)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 8)
    assert torch.equal(Q.unpack_int4(packed, sym).float(), codes)


@pytest.mark.parametrize("width,group,expected", [(576, 128, 64), (576, 64, 64), (1536, 128, 128), (576, None, 576),
                                                   (96, 64, 32), (100, 64, 4), (64, 128, 64)])
def test_resolve_group(width, group, expected):
    assert Q.resolve_group(width, group) == expected


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, None, True), (8, 16, False)])
def test_rtn_error_bounded_by_half_a_step(bits, group, sym):
    w = torch.randn(16, 64)
    scheme = Q.QScheme(bits, group, sym)
    g = Q.resolve_group(64, group)
    codes, scale, zero = Q.rtn(w, scheme, g)
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    err = (Q.dequantize_groups(codes, scale, zero, g) - w).abs()
    step = scale.repeat_interleave(g, dim=1)
    assert (err <= step / 2 + 1e-6).all()


def _row_errors(w, scheme):
    codes, scale, zero = Q.rtn(w, scheme, scheme.group_size)
    return ((Q.dequantize_groups(codes, scale, zero, scheme.group_size) - w) ** 2).reshape(-1, scheme.group_size).sum(1)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_signed_scale_puts_each_groups_extreme_on_the_extra_negative_level(bits):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    sch = Q.QScheme(bits, 32, True, scale_search="signed")
    codes, scale, _ = Q.rtn(w, sch, 32)
    wg, cg = w.reshape(-1, 32), codes.reshape(-1, 32)
    at = wg.abs().argmax(1, keepdim=True)
    ext = wg.gather(1, at).squeeze(1)
    assert codes.min() >= sch.qmin and codes.max() <= sch.qmax
    assert (cg.gather(1, at).squeeze(1) == sch.qmin).all()  # w_ext = qmin * scale exactly
    assert torch.allclose(scale.flatten().abs(), ext.abs() / 2 ** (bits - 1))
    assert ((scale.flatten() < 0) == (ext > 0)).all()
    # one more level and a finer step: less squared error over the matrix than max|w| / (2^(b-1) - 1)
    assert _row_errors(w, sch).sum() < _row_errors(w, Q.QScheme(bits, 32, True)).sum()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fp16", [False, True])
def test_mse_scale_is_never_worse_than_the_candidates_it_searched(sym, fp16):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 3, 64)
    mse = _row_errors(w, Q.QScheme(4, 32, sym, fp16, "mse"))
    for other in (["absmax", "signed"] if sym else ["absmax"]):
        ref = _row_errors(w, Q.QScheme(4, 32, sym, fp16, other))
        assert (mse <= ref * (1 + 1e-6)).all() and mse.sum() < ref.sum()


def test_absmax_scales_are_bit_identical_to_the_rule_before_scale_search():
    """The default keeps artifacts quantized before scale_search existed bit for bit (max|w| divided by qmax)."""
    w = torch.randn(300, 32, generator=torch.Generator().manual_seed(2)) * 0.037
    for bits in (3, 4, 8):
        sch = Q.QScheme(bits, 32, True)
        assert torch.equal(Q.group_params(w, sch)[0], w.abs().amax(dim=1).clamp(min=1e-12) / sch.qmax)


def test_fp16_scales_keep_their_sign_and_never_round_to_zero():
    got = Q.fp16_rounded(torch.tensor([-1e-9, -3.0001, 3.0001, 1e-9, 1e6]))
    assert got.tolist() == [-(2.0 ** -24), -3.0, 3.0, 2.0 ** -24, 65504.0]


def _correlated_inputs(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("search", ["absmax", "mse"])
def test_gptq_beats_rtn_on_output_error(act_order, group, search):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = _correlated_inputs()
    h = 2 * x.T @ x / x.shape[0]
    scheme = Q.QScheme(4, group, True, scale_search=search)
    codes, scale, zero = gptq_quantize(w, h, scheme, group, 0.01, act_order, 128)
    assert codes.min() >= -8 and codes.max() <= 7
    w_gptq = Q.dequantize_groups(codes, scale, zero, group)
    w_rtn = Q.dequantize_groups(*Q.rtn(w, scheme, group), group)
    err = lambda wh: ((x @ (w - wh).T) ** 2).sum()
    assert err(w_gptq) < 0.8 * err(w_rtn)


def test_weight_only_linear_packs_to_under_035_of_fp32():
    lin = torch.nn.Linear(256, 128, bias=False)
    codes, scale, zero = Q.rtn(lin.weight, Q.QScheme(4, 128, True), 128)
    q = WeightOnlyLinear.from_codes(lin, codes, scale, zero, 4, 128)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert stored <= 0.35 * lin.weight.numel() * 4


def _ctx(path):
    m = load(str(path))
    return m, T.StepContext(kind=m.kind, tokenizer=m.tokenizer)


def test_group_fallback_is_recorded_and_strict_refuses():
    layers = [("a", torch.nn.Linear(96, 8)), ("b", torch.nn.Linear(128, 8)), ("c", torch.nn.Linear(32, 8))]
    ctx = T.StepContext(kind="causal-lm")
    groups = T.plan_groups(layers, T.get("rtn").config(bits=4, group_size=64), ctx)
    assert groups == {"a": 32, "b": 64, "c": 32}  # c: the group is wider than the layer, so one group per row
    assert len(ctx.notes) == 1 and "does not divide the input width of 1 layers" in ctx.notes[0]
    with pytest.raises(UnsupportedError, match=r"group_size 64 does not divide the input width of 1 layers \(a\)"):
        T.plan_groups(layers, T.get("rtn").config(bits=4, group_size=64, strict=True), T.StepContext(kind="causal-lm"))


def test_rtn_records_groups_per_layer(tiny_llama):
    from slimctl.quant.layers import WeightOnlyLinear

    m, ctx = _ctx(tiny_llama)
    ref = copy.deepcopy(m.model)
    stats = T.get("rtn").apply(m.model, T.get("rtn").config(bits=4, group_size=32), ctx)
    assert set(stats["groups"].values()) == {32} and not ctx.notes
    for name, group in stats["groups"].items():  # the layers say what the stats say, and hold RTN's codes
        q, w = m.model.get_submodule(name), ref.get_submodule(name).weight.detach()
        assert isinstance(q, WeightOnlyLinear) and q.bits == 4 and q.group_size == group
        assert q.weight_scale.shape == (w.shape[0], w.shape[1] // group)
        scale = w.reshape(w.shape[0], -1, group).abs().amax(-1, keepdim=True) / 7  # symmetric int4: codes -8..7
        rtn = (w.reshape(w.shape[0], -1, group) / scale).round().clamp(-8, 7) * scale
        assert torch.allclose(q.dequantized(torch.float32), rtn.reshape(w.shape), atol=1e-6)


def test_gptq_on_tiny_llama_runs_block_by_block(tiny_llama):
    m, ctx = _ctx(tiny_llama)
    ref = copy.deepcopy(m.model)
    stats = T.get("gptq").apply(m.model, T.get("gptq").config(bits=4, group_size=32, calib_samples=4, calib_seq_len=32), ctx)
    assert stats["relative_output_error"] and all(0 <= e < 1 for e in stats["relative_output_error"].values())
    assert sum(isinstance(x, WeightOnlyLinear) for x in m.model.modules()) == len(stats["layers"])
    ids = torch.randint(1000, 5000, (1, 16))
    with torch.inference_mode():
        a, b = ref(input_ids=ids).logits, m.model(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_smoothquant_folding_is_exact_before_quantization(tiny_llama, monkeypatch):
    """With the int8 swap disabled, smoothing alone must not change the model's outputs."""
    from slimctl.techniques import smoothquant

    m, ctx = _ctx(tiny_llama)
    ref = copy.deepcopy(m.model)
    monkeypatch.setattr(smoothquant, "select_linears", lambda model, ignore: [])
    stats = smoothquant.apply(m.model, smoothquant.SmoothQuantConfig(calib_samples=2, calib_seq_len=32, alpha=0.8), ctx)
    assert stats["smoothed"] and any(v["max_scale"] != 1.0 for v in stats["smoothed"].values())
    ids = torch.randint(1000, 5000, (1, 16))
    with torch.inference_mode():
        assert torch.allclose(ref(input_ids=ids).logits, m.model(input_ids=ids).logits, atol=1e-4)


def test_smoothquant_unknown_architecture_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = None
    with pytest.raises(UnsupportedError):
        T.get("smoothquant").apply(model, T.get("smoothquant").config(), T.StepContext(kind="encoder"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_packing_matches_compressed_tensors(bits, dim):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from slimctl.formats.ctformat import pack_int32, unpack_int32

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (24, 40))
    ours = pack_int32(codes, bits, dim)
    theirs = ct.pack_to_int32(codes.to(torch.int8), bits, packed_dim=dim)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, tuple(codes.shape), dim).to(torch.int64), codes)


_CT_RELOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 3000]])
with torch.inference_mode():
    print(json.dumps(m(input_ids=ids).logits.float().flatten().tolist()))
"""


@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": None},
                                  {"bits": 4, "group_size": 32, "fp16_scales": True},
                                  {"bits": 4, "group_size": 32, "fp16_scales": True, "scale_search": "signed"},
                                  {"bits": 4, "group_size": 32, "fp16_scales": True, "lm_head": True}],
                         ids=["int4", "int8-channel", "int4-fp16-scales", "int4-signed-scales", "int4-int8-head"])
def test_weight_only_artifact_loads_in_plain_transformers_with_compressed_tensors(opts, tiny_llama, tmp_path, fast_recipe):
    """The artifact is compressed-tensors pack-quantized: transformers + compressed-tensors load it
    without slimctl and give exactly the logits slimctl's own loader gives."""
    pytest.importorskip("compressed_tensors")
    import json
    import subprocess
    import sys

    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    out = tmp_path / "o"
    head = opts.get("lm_head", False)  # the LM head untied and int8 per channel (lm_head step): its own config group
    steps = [{"method": "rtn", **{k: v for k, v in opts.items() if k != "lm_head"}}] + ([{"method": "lm_head"}] if head else [])
    rep = pipeline.run(R.load(fast_recipe(steps)), str(tiny_llama), out, isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    cfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert ("lm_head" in cfg["ignore"]) != head
    p = subprocess.run([sys.executable, "-c", _CT_RELOAD, str(out / "model")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = torch.tensor(json.loads(p.stdout.strip().splitlines()[-1]))
    ours = load(str(out / "model")).model
    with torch.inference_mode():
        mine = ours(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 3000]])).logits.float().flatten()
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs - mine).abs().max()
    if opts["bits"] == 4 and not head:  # fp16-rounded scales are stored in 16 bits: 4 + 16/32 = 4.5 bits per weight, else 5
        names = [n for n, m in ours.named_modules() if isinstance(m, WeightOnlyLinear)]
        assert bits_per_weight(ours, names) == pytest.approx(4 + (16 if opts.get("fp16_scales") else 32) / 32)


def test_asymmetric_artifact_keeps_slimctl_layout_and_reloads_bitwise(tiny_llama, tmp_path, fast_recipe):
    import json

    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    rep = pipeline.run(R.load(fast_recipe([{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}])),
                       str(tiny_llama), tmp_path / "o", isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    assert "quantization_config" not in json.loads((tmp_path / "o" / "model" / "config.json").read_text())


def test_fp8_is_refused_without_native_support_and_emulates_on_request(tiny_llama):
    from slimctl.errors import UnsupportedError
    from slimctl.quant.fp8 import Fp8Linear, fp8_supported

    if fp8_supported()[0]:
        pytest.skip("this machine has native FP8")
    m, ctx = _ctx(tiny_llama)
    t = T.get("fp8")
    with pytest.raises(UnsupportedError, match="compute capability 8.9"):
        t.apply(m.model, t.config(), ctx)
    stats = t.apply(m.model, t.config(allow_emulation=True), ctx)
    assert stats["native"] is False and any("emulated" in n for n in ctx.notes)
    assert max(stats["relative_weight_error"].values()) < 0.05  # e4m3 keeps 3 mantissa bits
    assert any(isinstance(x, Fp8Linear) and x.weight.dtype == torch.float8_e4m3fn for x in m.model.modules())


def test_fp8_linear_matches_float_within_e4m3_precision():
    from slimctl.quant.fp8 import Fp8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64, generator=g)
    q = Fp8Linear.from_linear(lin)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert float((y - ref).norm() / ref.norm()) < 0.08


_PLAIN_BNB = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
cls = AutoModelForCausalLM if sys.argv[2] == "lm" else AutoModelForSequenceClassification
m = cls.from_pretrained(sys.argv[1], device_map="cpu").eval()
with torch.inference_mode():
    print(json.dumps(m(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).logits.flatten().tolist()))
"""


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bnb_artifact_reloads_in_plain_transformers(mode, tiny_llama, tmp_path, fast_recipe):
    pytest.importorskip("bitsandbytes")
    import json
    import subprocess
    import sys

    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    rep = pipeline.run(R.load(fast_recipe([{"method": "bnb", "mode": mode}])), str(tiny_llama), tmp_path / "o", isolate=False)
    assert rep["artifact"]["reload_check"]["max_abs_diff"] <= 1e-5
    assert rep["delta"]["top1_agreement"] > 0.9
    step = rep["slimmed"]["steps"][0]
    assert step["layers"] and "lm_head" in step["left_float"]
    cfg = json.loads((tmp_path / "o" / "model" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    out = subprocess.run([sys.executable, "-c", _PLAIN_BNB, str(tmp_path / "o" / "model"), "lm"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-800:]
    theirs = torch.tensor(json.loads(out.stdout))
    mine = load(str(tmp_path / "o" / "model")).model
    with torch.inference_mode():
        ours = mine(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).logits.flatten()
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_bnb_leaves_a_two_class_head_in_float_with_a_note(tiny_classifier):
    pytest.importorskip("bitsandbytes")
    m, ctx = _ctx(tiny_classifier)
    t = T.get("bnb")
    stats = t.apply(m.model, t.config(), ctx)
    assert "classifier" in stats["left_float"] and any("not divisible by 32" in n and "classifier" in n for n in ctx.notes)
    assert ctx.replacement is not None
