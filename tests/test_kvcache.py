"""Quantized KV cache: the q8_0 / q4_0 block layouts round-trip within their step, decode with an int8 cache
gives fp decode's greedy tokens, bytes per token are what the layout says, eval and bench take kv_cache, and
llama.cpp takes its own q8_0 / q4_0 cache types."""
from __future__ import annotations

import inspect

import pytest
import torch

from conftest import _tokenizer, run_cli, tiny_llama_model

from slimctl.quant.kvcache import cache_arg
from slimctl.errors import UnsupportedError
from slimctl.quant.kvcache import BLOCK, QuantizedKVCache, bytes_per_token, dequantize, quantize


@pytest.mark.parametrize("bits,codes_per_byte", [(8, 1), (4, 2)])
def test_block_layout_round_trips_within_half_a_step(bits, codes_per_byte):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 64) * torch.logspace(-2, 1, 64)  # blocks of very different ranges
    q, d = quantize(x, bits)
    assert q.shape == (2, 3, 7, 64 // codes_per_byte) and d.shape == (2, 3, 7, 64 // BLOCK) and d.dtype == torch.float16
    y = dequantize(q, d, bits, torch.float32)
    step = d.float().abs().repeat_interleave(BLOCK, -1)
    # round to nearest (+ fp16 scale rounding); q4_0's grid −8d..7d clips the short side by at most one step
    bound = step * (0.5 if bits == 8 else 1.0) + 1e-3 * x.abs() + 1e-6
    assert torch.all((y - x).abs() <= bound)
    if bits == 4:  # q4_0: the element of largest magnitude is exactly −8 d
        g = x.unflatten(-1, (-1, BLOCK))
        big = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        assert torch.allclose(big, -8 * d.float().unsqueeze(-1), rtol=1e-3)


def _model(head_dim=32):
    return tiny_llama_model(_tokenizer(), 0, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)


def _greedy(model, ids, n, cache):
    extra = {} if cache is None else {"cache" if "cache" in inspect.signature(model.generate).parameters
                                      or "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, **extra)[0, ids.shape[1]:].tolist()


def _expected_bytes(config, kind: str, tokens: int, fp: int = 4) -> int:
    """2 layers x 2 kv heads x 32 dims: the first token in fp for K and V; values of the others quantized;
    keys quantized in whole groups (32 tokens for int8 here, 64 with a scale and a minimum for int4: the same
    bytes per value as q4_0's values), the rest waiting in fp."""
    per_value = {"int8": 1 + 2 / BLOCK, "int4": 0.5 + 2 / BLOCK}[kind]
    key_group = {"int8": BLOCK, "int4": 64}[kind]
    assert {"int8": 1 + 2 / BLOCK, "int4": 0.5 + 4 / 64}[kind] == per_value
    rows = config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    rest = tokens - 1
    grouped = rest - rest % key_group
    return round(rows * (2 * fp + rest * per_value + grouped * per_value + (rest - grouped) * fp))


def test_int8_cache_decodes_fp_decodes_greedy_tokens_and_stores_what_the_layout_says():
    model = _model()
    with torch.no_grad():  # a peaked distribution: greedy tokens that mean something
        model.lm_head.weight.mul_(40)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 12731, 2291, 102] * 4])
    fp = _greedy(model, ids, 12, None)
    cache = QuantizedKVCache(model.config, "int8")
    assert _greedy(model, ids, 12, cache) == fp
    tokens = ids.shape[1] + 12 - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == tokens
    assert cache.nbytes() == _expected_bytes(model.config, "int8", tokens)
    # fp32 512 B/token here; int8 1 + 2/32 bytes per value; int4 0.5 + 2/32 (q8_0 / q4_0 against f16: 34/64, 18/64)
    assert bytes_per_token(model.config, "fp", 4) == 2 * 2 * 2 * 32 * 4
    assert bytes_per_token(model.config, "int8", 4) / bytes_per_token(model.config, "fp", 2) == pytest.approx(34 / 64)  # head 32
    wide = _model(head_dim=64).config  # int8 takes blocks of 64 where the head allows: 1 + 2/64 bytes per value
    assert bytes_per_token(wide, "int8", 4) / bytes_per_token(wide, "fp", 2) == pytest.approx(33 / 64)
    assert bytes_per_token(wide, "int8", 4, llama_cpp=True) / bytes_per_token(wide, "fp", 2) == pytest.approx(34 / 64)
    assert bytes_per_token(model.config, "int4", 4) / bytes_per_token(model.config, "fp", 2) == pytest.approx(18 / 64)


def test_keys_wait_for_a_full_group_and_values_do_not():
    model = _model()
    cache = QuantizedKVCache(model.config, "int4")
    layer = cache.layers[0]
    k = torch.randn(1, 2, 70, 32)
    keys, values = layer.update(k, k.clone())
    assert keys.shape == values.shape == k.shape
    assert torch.equal(keys[..., :1, :], k[..., :1, :])  # the sink token is kept as it came
    assert torch.equal(keys[..., 65:, :], k[..., 65:, :])  # 5 keys wait for their group of 64
    assert not torch.equal(keys[..., 1:65, :], k[..., 1:65, :]) and not torch.equal(values[..., 1:, :], k[..., 1:, :])
    assert len(layer._k) == 3 and layer._k[1].shape[-1] == 1 and layer._v[0].shape[-2] == 69  # scale + minimum per group
    keys2, _ = layer.update(torch.randn(1, 2, 60, 32), torch.randn(1, 2, 60, 32))
    assert keys2.shape[-2] == 130 and layer._k[1].shape[-1] == 2 and torch.equal(keys2[..., 1:65, :], keys[..., 1:65, :])


def test_int4_keys_round_trip_within_half_a_step_of_their_range():
    from slimctl.quant.kvcache import dequantize_asym, quantize_asym

    x = torch.randn(3, 5, 128) * torch.linspace(0.1, 4, 128) + 2.0  # an offset symmetric codes would waste
    q, d, m = quantize_asym(x, 64)
    assert q.dtype == torch.uint8 and q.shape[-1] == 64 and d.shape[-1] == m.shape[-1] == 2
    err = (dequantize_asym(q, d, m, torch.float32, 64) - x).abs().unflatten(-1, (2, 64)).amax(-1)
    assert (err <= d.float() * 0.5 + 2e-3 * x.abs().unflatten(-1, (2, 64)).amax(-1)).all()


def test_int4_cache_changes_the_logits_a_little_and_int8_less():
    model = _model()
    ids = torch.randint(1000, 5000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        arg = cache_arg(model)
        err = {k: (model(input_ids=ids, **{arg: QuantizedKVCache(model.config, k)}, use_cache=True).logits - ref)
               .abs().max().item() for k in ("int8", "int4")}
    assert 0 < err["int8"] < err["int4"] < 0.1 * ref.abs().max().item()


def test_layouts_the_cache_cannot_hold_are_refused_by_name():
    with pytest.raises(UnsupportedError, match="head_dim 24"):
        QuantizedKVCache(_model(head_dim=24).config, "int8")
    from transformers import MistralConfig

    with pytest.raises(UnsupportedError, match="sliding"):
        QuantizedKVCache(MistralConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, sliding_window=16), "int4")
    with pytest.raises(UnsupportedError, match="unknown KV cache type"):
        QuantizedKVCache(_model().config, "q5_1")


def test_eval_with_a_quantized_cache_is_compared_with_the_fp_cache_of_the_same_model(tiny_dir):
    from slimctl import api
    from slimctl.specs import EvalSpec

    path = tiny_dir / "kvllama"
    model, tok = _model(), _tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    out = {k: api.evaluate(str(path), spec=EvalSpec(max_samples=2, seq_len=64, max_tokens=256, kv_cache=k)) for k in ("q8_0", "int4")}
    for kind, ev in out.items():
        assert ev["against"].endswith("(fp KV cache)") and ev["settings"]["kv_cache"] == {"q8_0": "int8"}.get(kind, kind)
        assert ev["vs_reference"]["perplexity_ratio"] != 1.0 and ev["vs_reference"]["kl_divergence"] > 0
    assert out["q8_0"]["vs_reference"]["kl_divergence"] < out["int4"]["vs_reference"]["kl_divergence"]


def test_bench_reports_kv_bytes_measured_on_the_cache():
    from slimctl.bench import bench_model
    from slimctl.specs import BenchSpec

    model, tok = _model(), _tokenizer()
    spec = dict(min_iters=1, min_seconds=0, warmup=0, decode_tokens=4, seq_len=96)
    fp = bench_model(model, tok, "causal-lm", BenchSpec(**spec))
    q4 = bench_model(model, tok, "causal-lm", BenchSpec(**spec, kv_cache="int4"))
    assert fp.kv_cache == "fp" and q4.kv_cache == "int4" and q4.kv_bytes_measured
    tokens = 96 + 4  # the prompt, then each decode step feeds the token before it
    assert fp.kv_bytes_per_token == pytest.approx(bytes_per_token(model.config, "fp", 4), rel=0.02)
    assert q4.kv_bytes_per_token == pytest.approx(_expected_bytes(model.config, "int4", tokens) / (96 + 4), rel=0.02)
    with pytest.raises(ValueError, match="eager decode only"):
        BenchSpec(**spec, kv_cache="int8", compile=True)


def test_a_bad_kv_cache_name_is_one_error_line(tiny_llama):
    p = run_cli("eval", tiny_llama, "--kv-cache", "q5_1", "--max-samples", "1")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "kv_cache" in lines[0]
