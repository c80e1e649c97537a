"""GPTAQ (gptq with `gptaq: true`): the asymmetric target solves its normal equations, block 0 (whose inputs are the
same on both streams) is quantized exactly as plain GPTQ does, later blocks are not, and streaming refuses it."""
import copy

import torch

from conftest import _tokenizer, tiny_llama_model
from slimctl import techniques
from slimctl.quant.layers import WeightOnlyLinear
from slimctl.techniques.gptq import GPTQConfig


def test_the_correction_brings_the_rounded_layer_closer_to_the_float_output():
    """On a layer whose float inputs differ systematically from the quantized model's, GPTAQ's codes give a lower
    ‖Ŵ X̃ − W X‖ than GPTQ's; with no difference (C = 0) they are GPTQ's codes exactly."""
    from slimctl.quant.integer import QScheme, dequantize_groups
    from slimctl.techniques.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    xq = torch.randn(2048, 64, generator=g)
    xf = xq @ (torch.eye(64) + 0.05 * torch.randn(64, 64, generator=g))  # earlier blocks' rounding, as a drift
    w = torch.randn(32, 64, generator=g)
    h, c = 2 / 2048 * xq.T @ xq, 2 / 2048 * (xf - xq).T @ xq
    sch = QScheme(4, 32, True)

    def err(cross, alpha=0.25):
        q, s, z = gptq_quantize(w.clone(), h, sch, 32, 0.01, True, 128, cross=cross, alpha=alpha)
        return float((dequantize_groups(q, s, z, 32) @ xq.T - w @ xf.T).norm()), q

    plain, q0 = err(None)
    same, q1 = err(torch.zeros_like(c))
    assert torch.equal(q0, q1) and same == plain
    assert err(c)[0] < 0.95 * plain and err(c, alpha=1.0)[0] < err(c)[0]


def _gptq(model, tok, **opts):
    ctx = techniques.StepContext(kind="causal-lm", seed=0, tokenizer=tok)
    cfg = GPTQConfig(bits=4, group_size=32, calib_samples=4, calib_seq_len=32, **opts)
    return techniques.get("gptq").apply(model, cfg, ctx)


def test_block_0_matches_plain_gptq_and_later_blocks_correct_for_earlier_rounding():
    tok = _tokenizer()
    base = tiny_llama_model(tok, seed=0)
    plain, asym = copy.deepcopy(base), copy.deepcopy(base)
    _gptq(plain, tok)
    out = _gptq(asym, tok, gptaq=True)
    q = {n: m for n, m in asym.named_modules() if isinstance(m, WeightOnlyLinear)}
    p = dict(plain.named_modules())
    assert len(q) == 14 and all(0 <= e < 1 for e in out["relative_output_error"].values())
    same = {n for n, m in q.items() if torch.equal(m.qweight, p[n].qweight) and torch.equal(m.weight_scale, p[n].weight_scale)}
    assert {n for n in q if n.startswith("model.layers.0.")} <= same
    assert any(n.startswith("model.layers.1.") and n not in same for n in q)


def test_gptaq_is_refused_when_streaming(tiny_llama, tmp_path):
    from conftest import run_cli

    p = run_cli("quantize", tiny_llama, "--method", "gptq", "--set", "gptaq=true", "--stream", "--out", tmp_path / "o",
                "--skip-bench")
    assert p.returncode == 2 and "gptaq: true" in p.stderr.strip().splitlines()[-1] and not (tmp_path / "o").exists()


def test_mixed_passes_gptaq_to_its_gptq_quantizer():
    """mixed with gptaq: the same per-Linear widths, block 0 as without it, later blocks corrected."""
    import pytest

    from slimctl.techniques.mixed import MixedConfig

    tok = _tokenizer()
    base = tiny_llama_model(tok, seed=0)
    plain, asym = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(avg_bits=6.0, group_size=32, calib_samples=4, calib_seq_len=32, sensitivity_samples=1, sensitivity_seq_len=32)
    ctx = lambda: techniques.StepContext(kind="causal-lm", tokenizer=tok)  # noqa: E731
    techniques.get("mixed").apply(plain, MixedConfig(**opts), ctx())
    techniques.get("mixed").apply(asym, MixedConfig(**opts, gptaq=True), ctx())
    q = {n: m for n, m in asym.named_modules() if isinstance(m, WeightOnlyLinear)}
    p = dict(plain.named_modules())
    assert q and all(p[n].bits == m.bits for n, m in q.items())
    same = {n for n, m in q.items() if torch.equal(m.qweight, p[n].qweight)}
    assert {n for n in q if n.startswith("model.layers.0.")} <= same
    assert any(n.startswith("model.layers.1.") and n not in same for n in q)
    with pytest.raises(ValueError, match="needs quantizer: gptq"):
        MixedConfig(**opts, gptaq=True, quantizer="rtn")


def test_the_cross_term_is_the_formula_and_layers_reading_one_input_share_it():
    """FloatStream.cross gives (2/n) Σ (x − x̃)ᵀ x̃ for each layer of a block (x: its input in the float model, x̃: in
    a model whose first block drifted); layers that read the same input (q/k/v, gate/up) get the same term, which the
    stream computes once for them."""
    from slimctl.techniques.gptaq import FloatStream

    tok = _tokenizer()
    float_model = tiny_llama_model(tok, seed=0)
    drifted = copy.deepcopy(float_model)
    with torch.no_grad():
        for p in drifted.model.layers[0].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))

    def block_inputs(model):
        got = []
        h = model.model.layers[1].register_forward_pre_hook(lambda m, a, k: got.append((a, k)), with_kwargs=True)
        with torch.inference_mode():
            model(input_ids=ids)
        h.remove()
        return got

    block = float_model.model.layers[1]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    layers = {n: block.get_submodule(n) for n in names}
    fl, qu = block_inputs(float_model), block_inputs(drifted)

    def layer_inputs(inputs):
        seen = {}
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, m in layers.items()]
        with torch.inference_mode():
            for a, k in inputs:
                block(*a, **k)
        for h in hooks:
            h.remove()
        return {n: torch.cat(v) for n, v in seen.items()}

    xf, xq = layer_inputs(fl), layer_inputs(qu)
    stream = FloatStream()
    stream.inputs = list(fl)
    cross = stream.cross(block, qu, layers)
    assert set(cross) == set(names)
    for n in names:
        want = 2 / xq[n].shape[0] * (xf[n] - xq[n]).T @ xq[n]
        assert torch.allclose(cross[n], want, rtol=1e-4, atol=1e-6), n
        assert want.abs().max() > 0
    assert torch.equal(cross["self_attn.q_proj"], cross["self_attn.v_proj"])
    assert torch.equal(cross["mlp.gate_proj"], cross["mlp.up_proj"])
    assert not torch.equal(cross["mlp.gate_proj"], cross["mlp.down_proj"])
