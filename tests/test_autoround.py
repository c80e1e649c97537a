"""autoround (SignRound): with no steps it is round-to-nearest with llama.cpp's signed scale, bit for bit; its steps
lower every block's output error; it is deterministic under the seed; the artifact reloads and exports like GPTQ's."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import _tokenizer, tiny_llama_model
from slimctl import techniques
from slimctl.quant.layers import WeightOnlyLinear
from slimctl.techniques.autoround import AutoRoundConfig, _Rounding
from slimctl.quant.integer import QScheme


def _run(model, tok, **opts):
    ctx = techniques.StepContext(kind="causal-lm", seed=0, tokenizer=tok)
    cfg = AutoRoundConfig(**{"bits": 4, "group_size": 32, "calib_samples": 8, "calib_seq_len": 32, "batch_size": 4,
                             "fp16_scales": True, **opts})
    return techniques.get("autoround").apply(model, cfg, ctx)


def _packed(model) -> dict:
    return {n: (m.qweight.clone(), m.weight_scale.clone()) for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}


def test_without_steps_it_is_round_to_nearest_with_the_signed_scale():
    tok = _tokenizer()
    base = tiny_llama_model(tok, seed=0)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, tok, iters=0)
    ctx = techniques.StepContext(kind="causal-lm", seed=0, tokenizer=tok)
    techniques.get("rtn").apply(b, techniques.get("rtn").config(bits=4, group_size=32, fp16_scales=True,
                                                                 scale_search="signed"), ctx)
    pa, pb = _packed(a), _packed(b)
    assert len(pa) == 14 and pa.keys() == pb.keys()
    assert all(torch.equal(pa[n][0], pb[n][0]) and torch.equal(pa[n][1], pb[n][1]) for n in pa)


def test_the_steps_lower_every_blocks_error_and_repeat_exactly():
    tok = _tokenizer()
    base = tiny_llama_model(tok, seed=0)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    out = _run(a, tok, iters=30)
    _run(b, tok, iters=30)
    assert len(out["blocks"]) == 2
    for rec in out["blocks"].values():
        assert rec["loss_best"] < 0.8 * rec["loss_first"], rec
    pa, pb = _packed(a), _packed(b)
    assert all(torch.equal(pa[n][0], pb[n][0]) and torch.equal(pa[n][1], pb[n][1]) for n in pa)
    assert out["bits_per_weight"] == pytest.approx(4.5)


def test_the_rounding_offset_stays_within_half_a_step_of_nearest():
    w = torch.randn(8, 64)
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    r = _Rounding(lin, QScheme(4, 32, True, True, "signed"), 32, True)
    with torch.no_grad():
        r.v.fill_(0.49)
        r.min_scale.fill_(0.9)
    q, scale, zero = r.codes()
    assert zero is None and q.min() >= -8 and q.max() <= 7
    exact = r.w / scale
    assert torch.all((q - exact).abs() <= 1.0) and torch.equal(q, q.round())


def test_autoround_is_refused_when_streaming(tiny_llama, tmp_path):
    from conftest import run_cli

    p = run_cli("quantize", tiny_llama, "--method", "autoround", "--stream", "--out", tmp_path / "o", "--skip-bench")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("Error:") and "autoround" in last and not (tmp_path / "o").exists()
