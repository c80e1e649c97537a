"""slice (SliceGPT-style residual-stream slicing): on a tiny model whose residual stream is built to live in k of its
d dimensions, slicing to k must keep the logits (the principal axes find that subspace; the channel order finds the
zero channels), and the smaller checkpoint must reload in plain transformers with the same logits."""
from __future__ import annotations

import pytest
import torch

from conftest import _tokenizer

from slimctl.errors import UnsupportedError

IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 12731, 2291, 102, 2000, 3000]])
K = 48  # of 64


def _ctx(tok):
    from slimctl.techniques import StepContext

    return StepContext(kind="causal-lm", tokenizer=tok)


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _confined(family: str, tok, basis: str):
    """A tiny model whose embedding rows and every residual writer's outputs lie in a k-dimensional subspace (pca:
    a random one; channels: the first k coordinates), with norm scales that are not all 1."""
    from slimctl.families import convert, tiny

    model = tiny.build(family, tok)
    convert.prepare(model)
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    if basis == "pca":
        u = torch.linalg.qr(torch.randn(d, K, generator=g))[0]
    else:
        u = torch.eye(d)[:, torch.randperm(d, generator=g)[:K]]
    p = u @ u.T
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb @ p)
        for name, m in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                m.weight.copy_(p @ m.weight)
            if "RMSNorm" in type(m).__name__ and m.weight.shape[0] == d:
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.mark.parametrize("family,basis", [("llama", "pca"), ("llama", "channels"), ("qwen2", "pca"), ("mistral", "channels")])
def test_slicing_a_stream_that_lives_in_k_dimensions_keeps_the_logits_and_reloads(family, basis, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimctl.techniques import get

    tok = _tokenizer()
    model = _confined(family, tok, basis)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = _logits(model)
    params = sum(p.numel() for p in model.parameters())
    ctx = _ctx(tok)
    cfg = get("slice").config(fraction=0.25, multiple_of=16, basis=basis, calib_samples=4, calib_seq_len=32)
    stats = get("slice").apply(model, cfg, ctx)
    assert (stats["hidden_before"], stats["hidden_after"], model.config.hidden_size) == (64, K, K)
    assert stats["kept_energy"] > 1 - 1e-9
    assert before.std() > 0.05
    after = _logits(model)
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()
    # pca with a tied head and a final norm scale that is not uniform: the head is untied, and the note says so
    assert stats["tied_head"] == (tied and basis == "channels")
    assert any("untied" in n for n in ctx.notes) == (tied and basis == "pca")
    if stats["tied_head"]:
        assert sum(p.numel() for p in model.parameters()) < params
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.config.hidden_size == K
    assert torch.equal(_logits(again), after)


def test_principal_axes_lose_less_than_the_same_cut_along_random_axes(monkeypatch):
    """On an unconfined model the cut costs something: along the principal axes less than along random ones."""
    from slimctl.families import convert, tiny
    from slimctl.techniques import get, slice as slicing

    tok = _tokenizer()

    def kl(random: bool):
        model = tiny.build("llama", tok)
        convert.prepare(model)
        with torch.no_grad():  # a stream with a few loud directions, as trained models have
            emb = model.get_input_embeddings().weight
            emb.mul_(torch.linspace(0.1, 3.0, emb.shape[1]))
        before = _logits(model).log_softmax(-1)
        if random:
            monkeypatch.setattr(slicing, "principal_axes", lambda sites: (
                torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0],
                torch.ones(64, dtype=torch.float64)))
        get("slice").apply(model, get("slice").config(fraction=0.25, multiple_of=16, calib_samples=4, calib_seq_len=32),
                           _ctx(tok))
        after = _logits(model).log_softmax(-1)
        return float((before.exp() * (before - after)).sum(-1).mean())

    assert kl(random=False) < 0.5 * kl(random=True)


@pytest.mark.parametrize("family,words", [("gemma", "embedding by √hidden_size"), ("phi", "LayerNorm"),
                                          ("gpt2", "derives the head size"), ("mixtral", "mixture-of-experts"),
                                          ("qwen2_moe", "mixture-of-experts")])
def test_families_slice_cannot_handle_are_refused_before_any_change(family, words):
    from slimctl.families import convert, tiny
    from slimctl.techniques import get

    tok = _tokenizer()
    model = tiny.build(family, tok)
    convert.prepare(model)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=words):
        get("slice").apply(model, get("slice").config(fraction=0.25, multiple_of=16, calib_samples=2), _ctx(tok))
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())


def test_the_kept_width_is_a_multiple_of_the_heads_and_of_multiple_of():
    from types import SimpleNamespace

    from slimctl.techniques.slice import SliceConfig, kept_width

    smollm = SimpleNamespace(hidden_size=576, num_attention_heads=9)
    assert kept_width(smollm, SliceConfig(fraction=0.0625, multiple_of=1)) == 540
    assert kept_width(smollm, SliceConfig(fraction=0.5)) == 288  # lcm(32, 9)
    with pytest.raises(UnsupportedError, match="smaller multiple_of"):
        kept_width(smollm, SliceConfig(fraction=0.1))  # 576 * 0.9 rounds back to 576 in steps of 288
