"""Fused weight-only kernels (slimctl.kernels): each path against the dequantize reference at bf16
tolerance, refusals that fall back and are counted, and eval measured in the benchmarked dtype."""
import copy
import json

import pytest
import torch

from slimctl.quant import kernels
from slimctl import techniques
from slimctl.quant.layers import WeightOnlyLinear
from slimctl.techniques.rtn import RTNConfig

CPU_BF16 = kernels.bf16_fast("cpu")[0]
needs_bf16 = pytest.mark.skipif(not CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _quantized(base, **rtn):
    m = copy.deepcopy(base)
    techniques.get("rtn").apply(m, RTNConfig(**rtn), techniques.StepContext(kind="causal-lm", seed=0))
    return m


def _logits(m, ids):
    with torch.inference_mode():
        return m(input_ids=ids).logits.float()


@needs_bf16
@pytest.mark.parametrize("rtn, kernel", [
    ({"bits": 4, "group_size": 32, "symmetric": True}, "int4-cpu"),
    ({"bits": 4, "group_size": 64, "symmetric": False}, "int4-cpu"),
    ({"bits": 4, "group_size": 128, "symmetric": True}, "int4-cpu"),
    ({"bits": 4, "group_size": 32, "symmetric": True, "scale_search": "signed"}, "int4-cpu"),  # negative scales
    ({"bits": 8, "group_size": None, "symmetric": True}, "int8-cpu"),
])
def test_each_cpu_kernel_matches_the_dequantize_reference(base, rtn, kernel):
    m = _quantized(base, **rtn)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(m, ids)
    plan = kernels.accelerate(m)
    assert plan.act_dtype == "bfloat16" and set(plan.fused.values()) == {kernel} and not plan.fallback
    assert len(plan.fused) == 14 and plan.warning() is None  # 7 Linear layers per block; the LM head is left alone
    assert next(m.parameters()).dtype == torch.bfloat16
    assert all(l.weight_scale.dtype == torch.float32 for l in m.modules() if isinstance(l, WeightOnlyLinear))
    got = _logits(m, ids)
    # bf16 activations: agree with the float32 dequantize reference to bf16 precision, and pick the same tokens
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_refused_group_sizes_keep_the_dequantize_path_and_are_counted(base):
    m = _quantized(base, bits=4, group_size=16, symmetric=True)
    ids = torch.randint(0, 512, (1, 8))
    ref = _logits(m, ids)
    plan = kernels.accelerate(m)
    assert not plan.fused and len(plan.fallback) == 14 and plan.act_dtype == "float32"
    assert plan.warning().startswith("14 of 14 quantized Linear layers run the slow dequantize path: model.layers.0.")
    assert "int4 group 16" in plan.warning() and "and 11 more" in plan.warning()
    assert torch.equal(_logits(m, ids), ref)  # nothing changed: same dtype, same path


def test_without_native_bf16_nothing_is_fused(base, monkeypatch):
    monkeypatch.setattr(kernels, "bf16_fast", lambda dev: (False, "no AVX512-BF16 or AMX on this CPU"))
    m = _quantized(base, bits=4, group_size=32)
    plan = kernels.accelerate(m)
    assert not plan.fused and plan.act_dtype == "float32"
    assert set(plan.fallback.values()) == {"bf16 is not native here (no AVX512-BF16 or AMX on this CPU)"}


@needs_bf16
def test_moving_a_layer_drops_its_packed_copy(base):
    m = _quantized(base, bits=4, group_size=32)
    kernels.accelerate(m)
    lin = m.model.layers[0].mlp.down_proj
    assert lin._kernel == "int4-cpu" and "kernel=int4-cpu" in repr(lin)
    lin.to("cpu", torch.float32)
    assert lin._kernel is None and lin._fused is None


def test_int8_with_groups_is_refused_by_the_int8_kernel(base):
    m = _quantized(base, bits=8, group_size=32, symmetric=True)
    kernel, why = kernels.choose(m.model.layers[0].mlp.up_proj, "cpu")
    assert kernel is None and ("one scale per output channel" in why or "bf16 is not native" in why)


@needs_bf16
def test_run_measures_accuracy_in_the_benchmarked_dtype(tiny_llama, tmp_path, fast_recipe):
    from conftest import run_cli

    r = fast_recipe([{"method": "rtn", "bits": 4, "group_size": 32}])
    p = run_cli("run", r, "--model", tiny_llama, "--out", tmp_path / "o", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    ev, bench = rep["slimmed"]["eval"]["kernels"], rep["slimmed"]["bench"]
    assert ev["act_dtype"] == bench["dtype"] == bench["kernels"]["act_dtype"] == "bfloat16"
    assert ev["kernels"] == bench["kernels"]["kernels"] == {"int4-cpu": 14}
    assert rep["baseline"]["bench"]["dtype"] == "float32" and "kernels" not in rep["baseline"]["bench"]
    assert "kernels" not in rep["baseline"]["eval"]
    assert rep["artifact"]["reload_check"]["bitwise_equal"] is True  # the artifact was compared before any repacking
    off = fast_recipe([{"method": "rtn", "bits": 4, "group_size": 32}], name="off", bench={
        "min_iters": 2, "min_seconds": 0, "warmup": 1, "decode_tokens": 4, "seq_len": 16, "batch_size": 2, "kernels": "off"})
    p = run_cli("run", off, "--model", tiny_llama, "--out", tmp_path / "off", "--json", "--inline")
    rep = json.loads(p.stdout)
    assert rep["slimmed"]["bench"]["dtype"] == "float32" and rep["slimmed"]["eval"]["kernels"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group, sym", [(32, True), (64, False), (128, True)])
def test_cuda_tinygemm_matches_the_dequantize_reference(base, group, sym):
    m = _quantized(base, bits=4, group_size=group, symmetric=sym).to("cuda")
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    ref = _logits(m, ids)
    plan = kernels.accelerate(m, "cuda")
    assert set(plan.fused.values()) == {"int4-tinygemm"} and plan.act_dtype == "bfloat16"
    got = _logits(m, ids)
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()


# --- compiled decode ---------------------------------------------------------------------------------

def test_compiled_decode_gives_the_eager_greedy_tokens(base):
    from slimctl.bench.decode import CompiledDecoder, EagerDecoder, greedy

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    dec = CompiledDecoder(base, 2, 16 + 8, "cpu")
    assert greedy(dec, ids, mask, 8) == greedy(EagerDecoder(base), ids, mask, 8)
    assert dec.compile_seconds > 0
    assert greedy(dec, ids, mask, 8) == greedy(EagerDecoder(base), ids, mask, 8)  # the cache resets per request


def test_bench_compile_reports_both_paths_and_keeps_compile_time_apart(tiny_llama):
    from conftest import run_cli

    p = run_cli("bench", tiny_llama, "--compile", "true", "--repeats", "2", "--min-iters", "2", "--min-seconds", "0",
                "--decode-tokens", "4", "--seq-len", "16", "--json")
    assert p.returncode == 0, p.stderr
    b = json.loads(p.stdout)["bench"]
    assert b["decode_mode"] == "compiled" and set(b["modes"]) == {"eager", "compiled"}
    assert b["modes"]["compiled"]["compile_seconds"] > 0 and "compile_seconds" not in b["modes"]["eager"]
    assert len(b["rounds_p50_ms"]) == 2 and b["latency_ms"] == b["modes"]["compiled"]["latency_ms"]
    # compile time is never a latency sample: the compiled path times as many requests as the eager one
    eager, compiled = (b["modes"][m]["phases"]["request"]["latency_ms"] for m in ("eager", "compiled"))
    assert compiled["count"] == eager["count"] == len(compiled["values"])


@pytest.mark.parametrize("setting, code, text", [("true", 2, "Error: bench.compile is true but torch.compile's Inductor needs a "
                                                                "C++ compiler"),
                                                  ("auto", 0, "compile auto: decode runs eager")])
def test_no_cxx_compiler(tiny_llama, setting, code, text):
    import os

    from conftest import run_cli

    p = run_cli("bench", tiny_llama, "--compile", setting, "--repeats", "1", "--min-iters", "1", "--min-seconds", "0",
                "--decode-tokens", "2", "--seq-len", "8", env={"PATH": "/nonexistent", "CXX": ""})
    assert p.returncode == code, p.stderr
    assert text in (p.stderr + p.stdout) and "Traceback" not in p.stderr
    assert os.environ.get("PATH")  # the test's own environment is untouched


# --- encoders: int8 weights and embeddings, dense bf16 compute --------------------------------------

def test_int8_encoder_recipe_shrinks_the_embeddings_and_runs_dense(tiny_bert, tmp_path):
    from conftest import REPO, run_cli

    import yaml

    doc = yaml.safe_load((REPO / "recipes" / "int8-bf16-encoder.yaml").read_text())
    doc["bench"] = {"min_iters": 2, "min_seconds": 0, "warmup": 1, "seq_len": 16, "batch_size": 2, "repeats": 1}
    (tmp_path / "enc.yaml").write_text(yaml.safe_dump(doc))
    p = run_cli("run", tmp_path / "enc.yaml", "--model", tiny_bert, "--out", tmp_path / "o", "--json", "--max-samples", "10")
    assert p.returncode in (0, 1), p.stderr
    rep = json.loads(p.stdout)
    failed = {g["name"] for g in rep["gates"] if g["passed"] is False}
    assert p.returncode == (0 if rep["passed"] else 1) and failed <= {"min_fidelity"}  # set for minilm, not random weights
    step = rep["slimmed"]["steps"][0]
    assert step["embeddings"]["module"] == "embeddings.word_embeddings" and step["embeddings"]["relative_weight_error"] < 0.01
    assert rep["artifact"]["loads_with"] == "slimctl" and rep["artifact"]["reload_check"]["bitwise_equal"]
    k = rep["slimmed"]["bench"]["kernels"]
    assert set(k["kernels"]) == {"dense"} and k["dense_copy_mb"] > 0 and k["dequantize_layers"] == 0
    assert rep["slimmed"]["bench"]["dtype"] == rep["slimmed"]["eval"]["kernels"]["act_dtype"]
    assert rep["delta"]["size_ratio"] < 0.35  # the int8 word-embedding table is most of a tiny BERT
    assert rep["delta"]["mean_cosine"] > 0.99


def test_embeddings_tied_to_the_lm_head_are_refused(tiny_llama, tmp_path):
    from conftest import run_cli

    p = run_cli("quantize", tiny_llama, "--method", "rtn", "--set", "embeddings=true", "--out", tmp_path / "o", "--skip-bench")
    assert p.returncode == 2 and "tied to the LM head" in p.stderr.strip().splitlines()[-1]


def test_int8_embedding_matches_its_dequantized_table():
    from slimctl.quant.layers import Int8Embedding

    emb = torch.nn.Embedding(50, 16)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.allclose(q(ids), torch.nn.functional.embedding(ids, q.dequantized(torch.float32)))
    assert (q(ids) - emb(ids)).abs().max() <= emb.weight.abs().max() / 127


def test_interleaved_decode_times_every_step_of_both_models(tiny_llama):
    from slimctl.bench.interleaved import measure

    r = measure((str(tiny_llama), str(tiny_llama)), requests=2, steps=3, seq_len=8, threads=1)
    assert r["steps_timed"] == [6, 6] and r["decode"] == "eager" and r["kernels"] == [None, None]
    assert all(t > 0 for t in r["step_ms_p50"]) and r["speedup_b_over_a"] == r["step_ms_p50"][0] / r["step_ms_p50"][1]


def test_interleaved_processes_swap_the_load_order_and_undo_it_in_the_ratio(tiny_llama, tmp_path):
    import shutil

    from slimctl.bench.interleaved import in_processes

    other = shutil.copytree(tiny_llama, tmp_path / "other")
    res = in_processes(str(tiny_llama), str(other), 2, {"requests": 1, "steps": 2, "seq_len": 8, "threads": 1})
    assert [r["folders"] for r in res] == [[str(tiny_llama), str(other)], [str(other), str(tiny_llama)]]
    assert res[0]["b_speedup"] == res[0]["speedup_b_over_a"] and res[1]["b_speedup"] == 1 / res[1]["speedup_b_over_a"]
