"""Techniques on tiny models: what they touch, what they leave alone, and how close the result stays."""
import copy

import pytest
import torch

from slimctl import techniques as T
from slimctl.models import load
from slimctl.quant.layers import Int8Linear


def _apply(model, method, **opts):
    t = T.get(method)
    return t.apply(model, t.config(**opts), T.StepContext(kind="causal-lm"))


@pytest.fixture
def llama(tiny_llama):
    return load(str(tiny_llama))


def _ids(n=2, l=12):
    return torch.randint(1000, 5000, (n, l), generator=torch.Generator().manual_seed(0))


def test_registry_is_explicit_and_complete():
    assert set(T.load_all()) == {"bf16", "fp16", "int8-dynamic", "rtn", "gptq", "awq", "mixed", "smoothquant", "magnitude", "wanda",
                                 "sparsegpt", "structured", "depth", "distill", "rotate", "onnx", "fp8", "bnb", "lm_head", "slice", "autoround"}


def test_protected_modules_cover_lm_head_and_tied_embedding(llama):
    assert "lm_head" in T.protected_modules(llama.model)
    names = [n for n, _ in T.select_linears(llama.model, [])]
    assert "lm_head" not in names and names


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_hits_the_sparsity_and_spares_embeddings(llama, scope):
    m = llama.model
    emb = m.get_input_embeddings().weight.clone()
    stats = _apply(m, "magnitude", sparsity=0.5, scope=scope)
    assert abs(stats["sparsity"] - 0.5) < 0.01
    if scope == "layer":
        assert all(abs(s - 0.5) < 1e-3 for s in stats["layers"].values())
    assert torch.equal(m.get_input_embeddings().weight, emb)
    assert "lm_head" not in stats["layers"]
    for name in stats["layers"]:
        w = m.get_submodule(name).weight
        assert abs((w == 0).float().mean().item() - stats["layers"][name]) < 1e-6
        assert not hasattr(m.get_submodule(name), "weight_mask")  # permanent, no reparametrisation


def test_magnitude_ignore_pattern(llama):
    before = copy.deepcopy(llama.model)
    stats = _apply(llama.model, "magnitude", sparsity=0.3, ignore=["*.mlp.*"])
    assert stats["layers"] and not any(".mlp." in n for n in stats["layers"])
    for name, lin in T.select_linears(llama.model, []):  # the weights, not only the stats: ignored ones untouched
        w, w0 = lin.weight, before.get_submodule(name).weight
        if ".mlp." in name:
            assert torch.equal(w, w0)
        else:
            assert abs((w == 0).float().mean().item() - 0.3) < 0.01 and torch.equal(w[w != 0], w0[w != 0])


def test_magnitude_zeroes_the_smallest(llama):
    m = llama.model
    name, lin = T.select_linears(m, [])[0]
    before = lin.weight.detach().abs().clone()
    _apply(m, "magnitude", sparsity=0.25)
    zeroed = lin.weight == 0
    assert before[zeroed].max() <= before[~zeroed].min()


@pytest.mark.parametrize("method,cls", [("rtn", "WeightOnlyLinear"), ("int8-dynamic", "Int8Linear")])
def test_int8_stores_real_int8_and_stays_close(llama, method, cls):
    from slimctl.quant import layers as qmodules

    m = llama.model
    ref = copy.deepcopy(m)
    _apply(m, method)
    qs = [mod for mod in m.modules() if isinstance(mod, getattr(qmodules, cls))]
    assert qs and all(q.qweight.dtype == torch.int8 for q in qs)
    assert isinstance(m.lm_head, torch.nn.Linear)
    ids = _ids()
    with torch.inference_mode():
        a, b = ref(input_ids=ids).logits, m(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()
    assert cos > 0.99


def test_int8_dynamic_is_per_token_so_rows_do_not_depend_on_the_batch(llama):
    m = llama.model
    _apply(m, "int8-dynamic")
    ids = _ids(3)
    with torch.inference_mode():
        full = m(input_ids=ids).logits
        one = m(input_ids=ids[1:2]).logits
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_int8_rows_quantize_exactly_to_their_scale():
    from slimctl.quant.layers import quantize_rows_int8

    w = torch.randn(8, 16)
    q, s = quantize_rows_int8(w)
    assert q.abs().max() == 127
    assert torch.allclose(q.float() * s[:, None], w, atol=(s.max() / 2).item() + 1e-7)


@pytest.mark.parametrize("method,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cast_keeps_non_persistent_buffers_in_float32(llama, method, dtype):
    m = llama.model
    _apply(m, method)
    assert {p.dtype for p in m.parameters()} == {dtype}
    inv = [b for n, b in m.named_buffers() if "inv_freq" in n]
    assert inv and all(b.dtype == torch.float32 for b in inv)


def test_every_registered_technique_has_its_row_in_the_methods_doc():
    """docs/methods.md explains each method as published; a technique registered without its row fails here."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/methods.md").read_text()
    assert not [n for n in T.load_all() if f"`{n}`" not in text]
