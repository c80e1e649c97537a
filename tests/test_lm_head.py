"""The lm_head step: a tied head untied and quantized while the input lookup keeps its float table, the fused int8
kernel taking it, the artifact reloading as it was saved, and the head written exactly into GGUF's Q8_0."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import _tokenizer, run_cli, tiny_llama_model
from slimctl import techniques
from slimctl.quant import kernels
from slimctl.quant.layers import WeightOnlyLinear
from slimctl.techniques.lm_head import LMHeadConfig

gguf = pytest.importorskip("gguf")


def _apply(model, **opts):
    ctx = techniques.StepContext(kind="causal-lm", seed=0)
    return techniques.get("lm_head").apply(model, LMHeadConfig(**opts), ctx), ctx


@pytest.fixture(scope="module")
def tied():
    return tiny_llama_model(_tokenizer(), seed=0)


def test_a_tied_head_is_untied_and_quantized_and_the_lookup_keeps_its_float_table(tied):
    import copy

    m = copy.deepcopy(tied)
    table = m.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, table.shape[0], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
    out, ctx = _apply(m)
    head = m.get_output_embeddings()
    assert isinstance(head, WeightOnlyLinear) and (head.bits, head.group_size) == (8, 64)
    assert head.weight_scale.dtype == torch.float16  # fp16 scales: GGUF Q8_0's exact layout
    assert out["untied"] and out["module"] == "lm_head" and any("untied" in n for n in ctx.notes)
    assert m.config.tie_word_embeddings is False
    assert torch.equal(m.get_input_embeddings().weight, table)
    step = table.abs().amax(1, keepdim=True) / 127
    assert ((head.dequantized(torch.float32) - table).abs() <= 0.51 * step + 1e-7).all()  # round to nearest per row
    assert 0 < out["relative_weight_error"]["lm_head"] < 0.01
    with torch.inference_mode():
        got = m(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    m.tie_weights()  # transformers re-ties on save and load when the config says so: it must not any more
    assert isinstance(m.get_output_embeddings(), WeightOnlyLinear)


def test_an_untied_head_stays_untied_and_int4_groups_are_taken(tied):
    import copy

    m = copy.deepcopy(tied)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    out, ctx = _apply(m, bits=4, group_size=32)
    assert not out["untied"] and not ctx.notes
    assert (m.lm_head.bits, m.lm_head.group_size) == (4, 32)


@pytest.mark.skipif(not kernels.bf16_fast("cpu")[0], reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_the_quantized_head_runs_on_the_fused_int8_kernel(tied):
    import copy

    m = copy.deepcopy(tied)
    _apply(m)
    plan = kernels.accelerate(m)
    assert plan.fused == {"lm_head": "int8-cpu"} and not plan.fallback


def test_embeddings_true_stores_the_untied_lookup_as_int8_rows(tied):
    import copy

    from slimctl.quant.layers import Int8Embedding

    m = copy.deepcopy(tied)
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
    out, _ = _apply(m, embeddings=True)
    assert isinstance(m.get_input_embeddings(), Int8Embedding) and out["embeddings"]["module"] == "model.embed_tokens"
    with torch.inference_mode():
        got = m(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()


def test_a_scaled_lookup_keeps_its_scale_as_int8_rows():
    """Gemma 3 multiplies each looked-up row by √hidden inside its embedding module: the int8 table keeps the
    multiplier (in slimctl.json), stores the rows unscaled (what GGUF's token_embd holds), and computes the same."""
    from slimctl.families import tiny
    from slimctl.quant.layers import Int8Embedding

    m = tiny.build("gemma3", _tokenizer()).eval()
    scale = float(m.get_input_embeddings().embed_scale)
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
    _apply(m, embeddings=True)
    emb = m.get_input_embeddings()
    assert isinstance(emb, Int8Embedding) and emb.multiplier == scale != 1.0 and emb.meta()["multiplier"] == scale
    assert Int8Embedding.from_meta(emb.meta(), torch.float32).multiplier == scale
    with torch.inference_mode():
        got = m(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()


def test_refusals_name_the_problem(tied, tiny_classifier, tmp_path):
    import copy

    from slimctl.errors import UnsupportedError

    m = copy.deepcopy(tied)
    _apply(m)
    with pytest.raises(UnsupportedError, match="already quantized"):
        _apply(m)
    with pytest.raises(UnsupportedError, match="does not divide the head's input width 64"):
        _apply(copy.deepcopy(tied), group_size=128)
    p = run_cli("quantize", tiny_classifier, "--method", "lm_head", "--out", tmp_path / "o", "--skip-bench")
    assert p.returncode == 2 and not (tmp_path / "o").exists()
    assert p.stderr.strip().splitlines()[-1] == ("Error: lm_head: this model has no output embedding; "
                                                 "the step quantizes a Linear LM head")


def test_gptq_then_lm_head_reloads_and_exports_the_head_exactly_to_q8_0(tiny_smol, tmp_path):
    import yaml

    from slimctl.models import load

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"version": 1, "name": "g32-head8", "export": {"format": "gguf"},
                                 "steps": [{"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "calib_seq_len": 64},
                                           {"method": "lm_head", "embeddings": True}],
                                 "eval": {"max_samples": 2, "seq_len": 64, "max_tokens": 128}, "bench": {"skip": True}}))
    p = run_cli("run", r, "--model", tiny_smol, "--out", tmp_path / "o", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(p.stdout)
    assert rep["artifact"]["reload_check"]["bitwise_equal"] and rep["slimmed"]["steps"][1]["untied"]
    assert rep["slimmed"]["steps"][1]["embeddings"]["relative_weight_error"] < 0.01
    (exp,) = rep["artifact"]["exports"]
    assert exp["exact_layers"] == 15 and not exp["requantized_layers"]
    m = load(str(tmp_path / "o" / "model")).model
    assert isinstance(m.lm_head, WeightOnlyLinear) and not m.config.tie_word_embeddings
    assert type(m.get_input_embeddings()).__name__ == "Int8Embedding"  # the table written as Q8_0 below, re-rounded
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "o" / "model.gguf").tensors}
    out = tensors["output.weight"]
    assert out.tensor_type == gguf.GGMLQuantizationType.Q8_0 and "token_embd.weight" in tensors
    ref = m.lm_head.dequantized(torch.float32).numpy()
    assert np.array_equal(gguf.quants.dequantize(out.data, out.tensor_type).reshape(ref.shape), ref)
    if os.environ.get("SLIMCTL_SKIP_LLAMACPP") != "1":  # llama.cpp reads the separate output.weight as torch does
        import llama_cpp

        ids = load(str(tmp_path / "o" / "model")).tokenizer("The BBC reported that markets rose", add_special_tokens=False)["input_ids"]
        llm = llama_cpp.Llama(model_path=str(tmp_path / "o" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        got = torch.from_numpy(llm.scores[len(ids) - 1].copy())
        with torch.inference_mode():
            want = m(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert torch.allclose(got, want, atol=0.05 * want.abs().max().item()), (got - want).abs().max()
