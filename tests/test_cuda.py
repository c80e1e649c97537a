"""CUDA-only checks (marker `cuda`; skipped without a GPU): the kernels and memory paths that a CPU
cannot exercise. They need no tokenizer or downloaded model, so scripts/gpu_check.sh runs them on
a bare GPU machine: FP8 through torch._scaled_mm, int4/int8 weight-only layers on the GPU,
bitsandbytes NF4 on CUDA, and a batch sweep whose large point really runs out of GPU memory."""
import json

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp8_runs_scaled_mm_and_matches_its_emulation():
    from slimctl.quant.fp8 import Fp8Linear, fp8_supported

    if not fp8_supported()[0]:
        pytest.skip(fp8_supported()[1])
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=True).cuda().bfloat16()
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 8, 256, device="cuda", dtype=torch.bfloat16)
    native = q(x)
    emulated = q.cpu().float()(x.cpu().float())  # same e4m3 values, dequantized float32 matmul
    assert native.dtype == torch.bfloat16 and native.shape == (4, 8, 512)
    assert _rel(native.cpu(), emulated) < 0.02
    assert _rel(native, lin(x)) < 0.1


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128)])
def test_weight_only_layer_on_gpu_matches_cpu(bits, group):
    from slimctl.quant.layers import WeightOnlyLinear
    from slimctl.quant.integer import QScheme, rtn

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    codes, scale, zero = rtn(lin.weight.detach(), QScheme(bits, group, True), group)
    q = WeightOnlyLinear.from_codes(lin, codes, scale, zero, bits, group)
    x = torch.randn(16, 256)
    ref = q(x)
    out = q.cuda()(x.cuda())
    assert torch.allclose(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert _rel(ref, lin(x)) < (0.15 if bits == 4 else 0.01)


def test_bnb_nf4_model_runs_on_cuda():
    pytest.importorskip("bitsandbytes")
    from slimctl import techniques as T

    model = _tiny_llama()
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        ref = model(ids).logits
    t = T.get("bnb")
    ctx = T.StepContext(kind="causal-lm")
    info = t.apply(model, t.config(mode="nf4", compute_dtype="bfloat16"), ctx)
    q = ctx.replacement.cuda()
    assert info["layers"] and all(p.device.type == "cuda" for p in q.parameters())
    with torch.no_grad():
        out = q(ids.cuda()).logits.float().cpu()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.9


def test_sweep_records_a_real_cuda_out_of_memory_and_backs_off(tmp_path):
    from slimctl.bench.catalogue import ARCHITECTURES
    from slimctl.bench.study import study
    from slimctl.recipe import BenchSpec

    cfg = dict(ARCHITECTURES["llama-1b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=32000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = BenchSpec(device="cuda", seq_len=128, decode_tokens=2, min_iters=2, min_seconds=0)
    # batch 4096 x 128 tokens: one MLP activation alone (x 512 channels, bf16) is 0.5 GB, over the 600 MB cap
    r = study(str(tmp_path), spec, config_only=True, sizes=[1, 4096], dtypes=["bf16"], max_memory_mb=600)
    rows = {s.batch_size: s for s in r.sweep}
    assert rows[1].status == "ok" and rows[1].peak_memory_mb > 0
    assert rows[4096].status == "out of memory", rows[4096]
    assert r["recommendation"]["batch_size"] == 1


def test_bench_cli_places_a_model_on_cpu_or_gpu(tmp_path):
    from conftest import run_cli
    from slimctl.bench.catalogue import ARCHITECTURES

    cfg = dict(ARCHITECTURES["llama-1b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=32000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = run_cli("bench", "--config", tmp_path / "config.json", "--device", "cpu,cuda", "--repeats", "1", "--slo-p95-ms", "60000",
                "--hourly-cost", "cpu=0.68,cuda=3.50", "--min-iters", "2", "--min-seconds", "0", "--seq-len", "32",
                "--decode-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert set(r["by_device"]) == {"cpu", "cuda"} and r["by_device"]["cuda"]["bench"]["device"] == "cuda"
    pl = r["placement"]
    assert pl["choice"] in ("cpu", "cuda") and set(pl["devices"]) == {"cpu", "cuda"}
    assert pl["devices"]["cuda"]["hourly_usd"] == 3.5 and "place it on" in pl["line"]


def _calibration_text(path) -> str:
    """Calibration text that needs no corpus package (a bare GPU machine has none): sentences of plain words."""
    import random

    rng = random.Random(0)
    words = ("the market rose as investors weighed the report on growth and prices while the team won its "
             "match and the film opened to strong reviews in cities across the country").split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(24)))
    return str(path)


@pytest.mark.parametrize("method, options", [
    ("gptq", {"bits": 4, "group_size": 32}),
    ("awq", {"bits": 4, "group_size": 32, "search_samples": 4}),
    ("mixed", {"avg_bits": 5.5, "group_size": 32, "sensitivity_samples": 2, "sensitivity_seq_len": 64}),
    ("structured", {"ffn": 0.25, "allocation": "global", "multiple_of": 8}),
])
def test_calibration_on_the_gpu_writes_the_cpu_format(tmp_path, method, options):
    """`device: cuda`: the blocks calibrate on the GPU, the artifact reloads, and (GPTQ, AWQ) it has the CPU run's
    tensors (names, shapes, dtypes), its float tensors agree within float tolerance and at least 99 % of its
    integer codes match; the step records the device and its peak GPU memory. mixed and structured choose between
    near-equal costs, so there only the run and the reload are compared."""
    from conftest import _save, _tokenizer, saved_tensors, tiny_llama_model

    from slimctl.recipe import from_dict
    from slimctl.workflow import pipeline

    tok = _tokenizer()
    model = _save(tiny_llama_model(tok, seed=3, num_hidden_layers=3, tie_word_embeddings=False), tok, tmp_path / "m")
    data = _calibration_text(tmp_path / "calib.txt")
    out = {}
    for dev in ("cpu", "cuda"):
        r = from_dict({"version": 1, "device": dev, "steps": [{"method": method, "calib_samples": 6, "calib_seq_len": 64,
                                                                "calib_data": data, **options}],
                       "eval": {"skip": True}, "bench": {"skip": True}}, "t")
        rep = pipeline.run(r, str(model), tmp_path / dev, isolate=False)
        out[dev] = (rep, saved_tensors(tmp_path / dev / "model"))
    (rc, a), (rg, b) = out["cpu"], out["cuda"]
    step = rg["slimmed"]["steps"][0]
    assert step["calibration_device"] == "cuda" and step["peak_gpu_mb"] > 0
    assert "calibration_device" not in rc["slimmed"]["steps"][0]
    assert rg["artifact"]["reload_check"]["max_abs_diff"] <= 1e-4
    if method in ("mixed", "structured"):  # a choice between near-equal costs (a format, a channel) may differ
        return
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            assert _rel(b[k], a[k]) < 2e-2, k
        else:
            assert (a[k] == b[k]).float().mean() >= 0.99, k
