"""Pruning techniques: masks, patterns, the published scores and updates, and structured slicing that
plain transformers reloads."""
import json
import subprocess
import sys

import pytest
import torch

from slimctl.quant import sparsity as S
from slimctl import techniques as T
from slimctl.errors import UnsupportedError
from slimctl.models import load
from slimctl.techniques.sparsegpt import SparseGPTConfig, sparsegpt_prune
from slimctl.techniques.wanda import WandaConfig, wanda_mask

CAL = {"calib_samples": 6, "calib_seq_len": 32}


def _apply(m, method, **opts):
    t = T.get(method)
    return t.apply(m.model, t.config(**opts), T.StepContext(kind=m.kind, tokenizer=m.tokenizer))


@pytest.fixture
def llama(tiny_llama):
    return load(str(tiny_llama))


def _correlated_inputs(n=512, d=64, seed=0, mixing=0.3):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.0, d)[torch.randperm(d, generator=g)]  # features of very different size
    mix = torch.eye(d) + mixing * torch.randn(d, d, generator=g)
    return (torch.randn(n, d, generator=g) * scales) @ mix


def _hessian(x):
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("opts,msg", [
    ({}, "either sparsity"), ({"sparsity": 0.5, "pattern": "2:4"}, "not both"),
    ({"pattern": "4:2"}, "0 < N < M"), ({"pattern": "2-4"}, "N:M"), ({"pattern": "0:4"}, "0 < N < M")])
def test_prune_options_reject_ambiguous_or_bad_patterns(opts, msg):
    with pytest.raises(Exception, match=msg):
        WandaConfig(**opts)


def test_global_scope_with_a_pattern_is_refused():
    with pytest.raises(Exception, match="global"):
        T.get("magnitude").config(pattern="2:4", scope="global")


def test_nm_mask_keeps_the_n_largest_in_every_group():
    score = torch.tensor([[4., 1, 3, 2, 0, 5, 6, 1]])
    mask = S.nm_mask(score, 2, 4)
    assert mask.tolist() == [[False, True, False, True, True, False, False, True]]
    w = torch.randn(16, 32)
    assert S.is_nm(w.masked_fill(S.nm_mask(w.abs(), 2, 4), 0), 2, 4)
    assert not S.is_nm(w, 2, 4)


def test_wanda_score_is_weight_times_input_norm_per_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])  # ‖x‖ = 10, 1, 1, 0.1
    mask = wanda_mask(w, sq_norm, WandaConfig(sparsity=0.5))
    # scores row 0: 10, 2, 3, 0.4 → prune cols 3, 1; row 1: 40, 3, 2, 0.1 → prune cols 3, 2
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_wanda_beats_magnitude_on_output_error_when_features_differ_in_scale():
    x = _correlated_inputs(mixing=0.0)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    err = lambda mask: float(((x @ (w - w.masked_fill(mask, 0)).T) ** 2).sum())
    mag = S.row_mask(w.abs(), 0.5)
    wanda = wanda_mask(w, (x * x).sum(0), WandaConfig(sparsity=0.5))
    assert err(wanda) < 0.8 * err(mag)


@pytest.mark.parametrize("opts", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"pattern": "4:8"}])
def test_sparsegpt_hits_the_target_and_its_update_beats_masking_alone(opts):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    cfg = SparseGPTConfig(block_size=32, **opts)
    new, loss = sparsegpt_prune(w, _hessian(x), cfg)
    zero = new == 0
    assert abs(float(zero.float().mean()) - cfg.target()) < 1e-6
    if cfg.nm:
        assert S.is_nm(new, *cfg.nm)
    err = lambda wh: float(((x @ (w - wh).T) ** 2).sum())
    assert err(new) < 0.7 * err(w.masked_fill(zero, 0))  # the OBS update repairs what the mask removed
    wanda = wanda_mask(w, (x * x).sum(0), WandaConfig(**opts))
    assert err(new) < err(w.masked_fill(wanda, 0))
    assert loss > 0


@pytest.mark.parametrize("method,opts", [("magnitude", {"pattern": "2:4"}), ("wanda", {"sparsity": 0.5, **CAL}),
                                          ("wanda", {"pattern": "2:4", **CAL}), ("sparsegpt", {"sparsity": 0.5, **CAL}),
                                          ("sparsegpt", {"pattern": "4:8", **CAL})])
def test_pruning_methods_hit_the_target_and_protect_embeddings(llama, method, opts):
    emb = llama.model.get_input_embeddings().weight.clone()
    stats = _apply(llama, method, **opts)
    assert stats["left_dense"] == ["lm_head"] and "lm_head" not in stats["layers"]
    assert torch.equal(llama.model.get_input_embeddings().weight, emb)
    assert abs(stats["sparsity"] - 0.5) < 1e-6
    assert 0 < stats["model_sparsity"] < stats["sparsity"]
    for name, lin in T.select_linears(llama.model, []):
        assert name in stats["layers"]
        if "pattern" in opts:
            assert S.is_nm(lin.weight, *map(int, opts["pattern"].split(":")))
        elif method == "wanda":  # Wanda compares within each output row
            assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()


def test_pattern_needs_divisible_widths(llama):
    with pytest.raises(UnsupportedError, match="divisible by 48"):
        _apply(llama, "magnitude", pattern="2:48")  # tiny llama's widths are 64 and 128


def test_sparsegpt_ignore_list_is_respected(llama):
    stats = _apply(llama, "sparsegpt", sparsity=0.5, ignore=["*.mlp.*"], **CAL)
    assert not any(".mlp." in n for n in stats["layers"])
    assert any(".mlp." in n for n in stats["left_dense"])


_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModel
cls = AutoModelForCausalLM if sys.argv[2] == "lm" else AutoModel
m = cls.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
with torch.inference_mode():
    o = m(input_ids=ids)
    t = o.logits if sys.argv[2] == "lm" else o.last_hidden_state
print(json.dumps({"out": t.flatten().tolist(), "params": sum(p.numel() for p in m.parameters()),
                  "config": m.config.to_dict()}))
"""


def _plain_reload(path, kind):
    p = subprocess.run([sys.executable, "-c", _RELOAD, str(path), kind], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


@pytest.mark.parametrize("opts,heads,kv,inter", [({"ffn": 0.25}, 4, 2, 96), ({"heads": 0.5}, 2, 1, 128),
                                                  ({"query_heads": 0.5}, 2, 2, 128),
                                                  ({"query_heads": 0.5, "reconstruct": False}, 2, 2, 128),
                                                  ({"ffn": 0.5, "heads": 0.5, "multiple_of": 16}, 2, 1, 64)])
def test_structured_llama_shrinks_and_reloads_in_plain_transformers(llama, tmp_path, opts, heads, kv, inter):
    before = sum(p.numel() for p in llama.model.parameters())
    stats = _apply(llama, "structured", **opts, **CAL)
    after = sum(p.numel() for p in llama.model.parameters())
    assert stats["params_before"] == before and stats["params_after"] == after < before
    c = llama.model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (heads, kv, inter)
    att = llama.model.model.layers[0].self_attn
    assert att.q_proj.out_features == heads * c.head_dim and att.k_proj.out_features == kv * c.head_dim
    llama.model.save_pretrained(tmp_path / "m")
    got = _plain_reload(tmp_path / "m", "lm")
    assert got["params"] == after
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.inference_mode():
        mine = llama.model(input_ids=ids).logits.flatten()
    assert torch.allclose(torch.tensor(got["out"]), mine, atol=1e-5)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_structured_keeps_the_most_important_ffn_channels(llama, reconstruct):
    """Channels whose down_proj column is zero contribute nothing: they must be the ones removed (by the
    score, or at zero cost by OBS, which then has nothing to compensate: the rest stays as it was)."""
    mlp = llama.model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, :32] = 0
    keep_cols = mlp.down_proj.weight[:, 32:].clone()
    _apply(llama, "structured", ffn=0.25, reconstruct=reconstruct, **CAL)
    got = llama.model.model.layers[0].mlp.down_proj.weight
    assert got.shape == keep_cols.shape and torch.allclose(got, keep_cols, atol=1e-5)


def _rel_error(w, w_hat, h):
    d = (w - w_hat).double()
    return float(torch.trace(d @ h.double() @ d.T) / torch.trace(w.double() @ h.double() @ w.double().T))


def test_obs_removal_is_the_least_squares_refit_and_beats_plain_removal():
    from slimctl.techniques.reconstruct import remove_groups

    x = _correlated_inputs(n=2048, d=64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = _hessian(x)
    r = remove_groups(w, h, torch.arange(64)[:, None], 16, dampening=1e-6)
    k = r.kept
    hd = h.double().clone()
    hd.diagonal().add_(1e-6 * hd.diagonal().mean())
    refit = (w.double() @ hd[:, k] @ torch.linalg.inv(hd[k][:, k])).float()  # least squares on the kept columns
    assert len(k) == 48 and torch.allclose(r.weight, refit, atol=1e-4)
    full = torch.zeros_like(w)
    full[:, k] = r.weight
    assert abs(r.error - _rel_error(w, full, h)) < 1e-6
    true_err = r.error * float(torch.trace(w.double() @ h.double() @ w.double().T))
    assert true_err <= r.path[-1][1] < 1.02 * true_err  # the path is measured on the damped H
    score = h.diagonal().sqrt() * w.norm(dim=0)  # plain removal: the score's top columns kept as they were
    sliced = torch.zeros_like(w)
    top = torch.topk(score, 48).indices
    sliced[:, top] = w[:, top]
    assert r.error < 0.5 * _rel_error(w, sliced, h)


def test_obs_removal_moves_a_constant_channel_into_the_bias():
    """FLAP's bias compensation: a removed input that is constant adds its mean contribution to the bias."""
    from slimctl.techniques.reconstruct import remove_groups

    g = torch.Generator().manual_seed(2)
    x = torch.cat([_correlated_inputs(n=1024, d=16), torch.full((1024, 1), 3.0)], 1)
    w, b = torch.randn(8, 17, generator=g), torch.randn(8, generator=g)  # every channel matters; only the
    r = remove_groups(w, _hessian(x), torch.arange(17)[:, None], 1, 1e-9, bias=b, mean=x.mean(0))  # constant one is free
    assert 16 not in r.kept.tolist() and r.error < 1e-6
    assert torch.allclose(r.bias, b + 3.0 * w[:, 16], atol=1e-4)


def test_obs_removal_of_head_groups_removes_whole_groups():
    from slimctl.techniques.reconstruct import remove_groups

    x = _correlated_inputs(n=1024, d=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    w[:, 8:16] *= 1e-3  # group 1 is nearly silent
    r = remove_groups(w, _hessian(x), torch.arange(64).view(8, 8), 1, 1e-6)
    assert r.kept.tolist() == [0, 2, 3, 4, 5, 6, 7] and r.weight.shape == (16, 56)


def test_obs_removal_with_a_quota_takes_the_same_number_from_every_label():
    """Query heads of a GQA layer: one from each key/value group, the cheapest within each group, even when
    the two cheapest of all share a group."""
    from slimctl.techniques.reconstruct import remove_groups

    x = _correlated_inputs(n=1024, d=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    w[:, 0:8] *= 1e-3  # heads 0 and 1 (both in group 0) nearly silent; head 6 less so
    w[:, 8:16] *= 1e-2
    w[:, 48:56] *= 0.1
    labels = torch.arange(8) // 4
    free = remove_groups(w, _hessian(x), torch.arange(64).view(8, 8), 2, 1e-6)
    fair = remove_groups(w, _hessian(x), torch.arange(64).view(8, 8), 2, 1e-6, labels=labels, quota=1)
    assert free.kept.tolist() == [2, 3, 4, 5, 6, 7]
    assert fair.kept.tolist() == [1, 2, 3, 4, 5, 7] and fair.error > free.error


def test_query_heads_need_grouped_query_attention(tiny_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _tokenizer

    tok = _tokenizer()
    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)).eval()
    t = T.get("structured")
    with pytest.raises(UnsupportedError, match="grouped-query attention"):
        t.apply(mha, t.config(query_heads=0.5, **CAL), T.StepContext(kind="causal-lm", tokenizer=tok))
    with pytest.raises(Exception, match="not both"):
        t.config(heads=0.5, query_heads=0.5)


def test_structured_reconstruction_brings_the_pruned_model_closer_to_the_original(tiny_llama):
    """Model level: the KL of the pruned model's next-token distribution to the original's, on text the
    calibration did not see, is lower with the refit than with plain removal."""
    ref = load(str(tiny_llama))
    ids = ref.tokenizer("an unrelated sentence about rivers, trains and the weather in spring", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        p = ref.model(input_ids=ids).logits.log_softmax(-1)
    kl = {}
    for reconstruct in (False, True):
        m = load(str(tiny_llama))
        _apply(m, "structured", ffn=0.5, heads=0.5, reconstruct=reconstruct, calib_samples=16, calib_seq_len=64)
        with torch.inference_mode():
            q = m.model(input_ids=ids).logits.log_softmax(-1)
        kl[reconstruct] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl[True] < kl[False]


def test_refit_with_a_drift_target_is_the_least_squares_fit_of_it():
    """remove_groups with cross statistics of a drift δ refits the kept columns (and the bias) to W x + δ:
    the damped least-squares solution computed directly."""
    from slimctl.techniques.reconstruct import remove_groups

    x = _correlated_inputs(n=2048, d=32).double()
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(8, 32, generator=g).double(), torch.randn(8, generator=g).double()
    delta = x @ torch.randn(32, 8, generator=g).double() * 0.1 + 0.05 * torch.randn(2048, 8, generator=g) + 0.3
    n = x.shape[0]
    h, mean = 2 / n * x.T @ x, x.mean(0)
    r = remove_groups(w, h, torch.arange(32)[:, None], 12, 1e-6, b, mean,
                      cross=2 / n * delta.T @ x, cross_sum=2 / n * delta.sum(0))
    xa = torch.cat([x[:, r.kept], torch.ones(n, 1)], 1)
    sol = torch.linalg.lstsq(xa, x @ w.T + b + delta).solution.T
    ours = torch.cat([r.weight.double(), r.bias.double()[:, None]], 1)
    assert float((xa @ (ours - sol).T).norm() / (xa @ sol.T).norm()) < 1e-4  # float32 weights, damping 1e-6
    plain = remove_groups(w, h, torch.arange(32)[:, None], 12, 1e-6, b, mean)  # no drift: the fit is worse
    assert torch.equal(plain.kept, r.kept) and not torch.allclose(plain.weight, r.weight, atol=1e-2)


def test_structured_model_target_brings_the_last_block_closer_to_the_unpruned_model(tiny_llama):
    """On the calibration text, the pruned model's last hidden state is closer to the original's when the
    FFN refit reproduces the unpruned model's block outputs (refit_target model) than its own (layer)."""
    ref = load(str(tiny_llama))
    t = T.get("structured")
    opts = dict(ffn=0.5, calib_samples=16, calib_seq_len=64)
    batches = t.config(**opts).batches(T.StepContext(kind=ref.kind, tokenizer=ref.tokenizer))

    def last_hidden(model):  # the last block's output (hidden_states[-1] is after the final norm)
        got = []
        hook = model.model.layers[-1].register_forward_hook(lambda mod, a, out: got.append(out[0] if isinstance(out, tuple) else out))
        with torch.inference_mode():
            for b in batches:
                model(**b)
        hook.remove()
        return torch.cat([h.flatten(0, 1) for h in got])

    h0, err = last_hidden(ref.model), {}
    for target in ("layer", "model"):
        m = load(str(tiny_llama))
        _apply(m, "structured", refit_target=target, **opts)
        err[target] = float((last_hidden(m.model) - h0).pow(2).sum())
    assert err["model"] < 0.97 * err["layer"], err  # least squares on the same inputs: lower up to damping


def _reloads_the_same(m, folder) -> None:
    """Save the pruned model as slimctl does, reload it with slimctl's loader: the same logits, bit for bit."""
    from slimctl.formats.transformers import Transformers

    Transformers().save(m.model, folder)
    m.tokenizer.save_pretrained(folder)
    back = load(str(folder)).model
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.inference_mode():
        assert torch.equal(back(input_ids=ids).logits, m.model(input_ids=ids).logits)


def test_structured_global_allocation_keeps_the_budget_and_reloads_with_slimctl(tiny_llama, tmp_path):
    m = load(str(tiny_llama))
    with torch.no_grad():  # layer 1's FFN hardly reaches the residual stream: global allocation takes from it
        m.model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    stats = _apply(m, "structured", ffn=0.25, allocation="global", multiple_of=1, **CAL)
    widths = [layer.mlp.down_proj.in_features for layer in m.model.model.layers]
    assert sum(widths) == 2 * 96 and widths[1] < widths[0]
    assert m.model.config.slimctl_layer_sizes == {"intermediate_size": widths} and stats["config_after"] == {"intermediate_size": max(widths)}
    _reloads_the_same(m, tmp_path / "g")
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):  # plain transformers refuses the shapes instead of loading them wrongly
        AutoModelForCausalLM.from_pretrained(tmp_path / "g")


@pytest.mark.parametrize("then", [{"method": "structured", "ffn": 0.25, "allocation": "global", "multiple_of": 1},
                                  {"method": "structured", "ffn": 0.25},
                                  {"method": "depth", "blocks": 1}], ids=["global", "uniform", "depth"])
def test_pruning_steps_chain_after_global_widths_and_the_result_reloads(tmp_path, then):
    """A second structured step (global or uniform) or depth pruning on a model whose layers already differ in
    width: each layer's own width is the start, the config's per-layer list follows, and slimctl reloads it."""
    from conftest import _save, _tokenizer, tiny_llama_model

    tok = _tokenizer()
    m = load(str(_save(tiny_llama_model(tok, seed=1, num_hidden_layers=4), tok, tmp_path / "src")))
    with torch.no_grad():
        m.model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    _apply(m, "structured", ffn=0.25, allocation="global", multiple_of=1, **CAL)
    first = [layer.mlp.down_proj.in_features for layer in m.model.model.layers]
    assert len(set(first)) > 1 and sum(first) == 4 * 96
    stats = _apply(m, then.pop("method"), **then, **CAL)
    widths = [layer.mlp.down_proj.in_features for layer in m.model.model.layers]
    if "ffn" in then:
        assert all(w <= f for w, f in zip(widths, first))
        assert sum(first) - sum(widths) == sum(round(0.25 * f) for f in first)  # a quarter of each, or that many in all
    else:
        assert widths == [w for i, w in enumerate(first) if i not in stats["blocks_removed"]]
    assert m.model.config.slimctl_layer_sizes == {"intermediate_size": widths}
    _reloads_the_same(m, tmp_path / "out")


def test_structured_rounds_spend_the_same_budget_in_shots(tmp_path):
    """rounds: the global FFN budget in several shots, each planned on the model pruned so far; the same total as
    one shot; uniform allocation or heads with rounds are refused."""
    from conftest import _save, _tokenizer, tiny_llama_model

    tok = _tokenizer()
    src = _save(tiny_llama_model(tok, seed=2, num_hidden_layers=4), tok, tmp_path / "src")
    widths = {}
    for rounds in (1, 3):
        m = load(str(src))
        t = T.get("structured")
        ctx = T.StepContext(kind=m.kind, tokenizer=m.tokenizer)
        stats = t.apply(m.model, t.config(ffn=0.3, allocation="global", multiple_of=1, rounds=rounds, **CAL), ctx)
        widths[rounds] = [layer.mlp.down_proj.in_features for layer in m.model.model.layers]
        notes = [n for n in ctx.notes if n.startswith("structured: per-layer FFN widths")]
        assert len(notes) == 1 and f"widths {min(widths[rounds])}-{max(widths[rounds])} (" in notes[0], notes  # one, the last
        assert stats["ffn_widths"] == widths[rounds] and stats.get("rounds", 1) == rounds
        assert sum(r["ffn_channels_removed"] for r in stats["layers"].values() if r) == 4 * 128 - sum(widths[rounds])
        assert stats["config_before"] == {"intermediate_size": 128}
    assert sum(widths[1]) == sum(widths[3]) == 4 * 128 - round(0.3 * 128) * 4
    m = load(str(src))
    with torch.no_grad():  # layer 1 is nearly free: every round would take from it, max_layer_share counts from the start
        m.model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    _apply(m, "structured", ffn=0.3, allocation="global", multiple_of=1, rounds=3, max_layer_share=0.5, **CAL)
    assert m.model.model.layers[1].mlp.down_proj.in_features == 64
    for bad in ({"allocation": "uniform"}, {"allocation": "global", "query_heads": 0.5}):
        with pytest.raises(Exception, match="rounds splits a global FFN budget"):
            T.get("structured").config(ffn=0.3, rounds=2, **bad)


def test_allocate_takes_the_cheapest_channels_in_each_layers_order():
    from slimctl.techniques.allocation import allocate

    paths = [[(2, 1.0), (4, 10.0)], [(2, 0.2), (4, 0.6), (6, 5.0)]]  # per-channel marginals: 0.5, 4.5 | 0.1, 0.2, 2.2
    assert allocate(paths, 4) == [0, 4]
    assert allocate(paths, 6) == [2, 4]
    assert allocate([[(2, 5.0), (4, 5.0)]], 3) == [3]  # a later, cheaper-looking step is never taken before its prefix


def test_structured_bert_prunes_ffn_and_keeps_heads_with_a_note(tiny_bert, tmp_path):
    m = load(str(tiny_bert))
    with pytest.raises(UnsupportedError, match="prune ffn instead"):
        _apply(m, "structured", heads=0.5, **CAL)
    t = T.get("structured")
    ctx = T.StepContext(kind=m.kind, tokenizer=m.tokenizer)
    stats = t.apply(m.model, t.config(ffn=0.5, heads=0.5, **CAL), ctx)
    assert any("heads left as they are" in n for n in ctx.notes)
    assert stats["config_after"] == {"intermediate_size": 32}
    m.model.save_pretrained(tmp_path / "b")
    got = _plain_reload(tmp_path / "b", "enc")
    assert got["params"] == stats["params_after"]
    with torch.inference_mode():
        mine = m.model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).last_hidden_state.flatten()
    assert torch.allclose(torch.tensor(got["out"]), mine, atol=1e-5)


def test_structured_needs_something_to_remove():
    with pytest.raises(Exception, match="ffn, heads and/or query_heads"):
        T.get("structured").config()


def test_prune_then_quantize_keeps_the_pattern_and_reloads(tiny_llama, tmp_path, fast_recipe):
    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    steps = [{"method": "wanda", "pattern": "2:4", **CAL}, {"method": "rtn", "bits": 4, "group_size": 32}]
    rep = pipeline.run(R.load(fast_recipe(steps)), str(tiny_llama), tmp_path / "o", isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"] is True
    m = load(str(tmp_path / "o" / "model")).model
    q = m.model.layers[0].mlp.down_proj
    assert S.is_nm(q.dequantized(torch.float32), 2, 4)  # symmetric int4 keeps zeros exact


def test_semi_structured_execution_is_refused_off_cuda(llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _apply(llama, "magnitude", pattern="2:4")
    with pytest.raises(UnsupportedError, match="CUDA GPU"):
        S.to_semi_structured(llama.model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_matches_dense_on_cuda():
    lin = torch.nn.Linear(128, 128, bias=False).cuda().half()
    with torch.no_grad():
        lin.weight.masked_fill_(S.nm_mask(lin.weight.abs().float(), 2, 4), 0)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    ref = lin(x)
    model = torch.nn.Sequential(lin)
    assert S.to_semi_structured(model) == 1
    assert torch.allclose(model(x), ref, atol=1e-2, rtol=1e-2)


def _deep_llama(tiny_dir, n=5):
    """A tiny Llama with `n` blocks whose block 2 barely changes the residual stream."""
    from conftest import _save, _tokenizer, tiny_llama_model

    tok = _tokenizer()
    m = tiny_llama_model(tok, seed=4, num_hidden_layers=n)
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        m.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    return _save(m, tok, tiny_dir / f"deep{n}")


@pytest.mark.parametrize("score", ["skip", "influence"])
def test_depth_removes_the_block_the_score_names_and_reloads(tmp_path, score):
    m = load(str(_deep_llama(tmp_path)))
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    stats = _apply(m, "depth", blocks=1, score=score, calib_samples=4, calib_seq_len=32)
    assert stats["blocks_removed"] == [2] and len(stats["block_scores"]) == 5
    assert min(range(1, 4), key=lambda i: stats["block_scores"][i]) == 2
    assert m.model.config.num_hidden_layers == 4 and len(m.model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in m.model.model.layers] == [0, 1, 2, 3]
    m.model.save_pretrained(tmp_path / "d")
    got = _plain_reload(tmp_path / "d", "lm")
    assert got["params"] == stats["params_after"] < stats["params_before"]
    with torch.inference_mode():
        mine = m.model(input_ids=ids).logits.flatten()
        # the KV cache follows the renumbered layers: cached decoding gives the uncached tokens
        gen = [m.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.allclose(torch.tensor(got["out"]), mine, atol=1e-5)
    assert gen[0].shape[1] == 10 and torch.equal(gen[0], gen[1])


def test_depth_shrinks_per_layer_config_lists(tmp_path):
    from conftest import _save, _tokenizer, tiny_llama_model

    from slimctl.techniques.depth import remove_blocks

    m = tiny_llama_model(_tokenizer(), seed=0, num_hidden_layers=4)
    m.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    remove_blocks(m, [1, 2])
    assert m.config.layer_types == ["full_attention", "sliding_attention"] and m.config.num_hidden_layers == 2


@pytest.mark.parametrize("opts,msg", [({"blocks": 4}, "at most 3 can go"), ({"fraction": 0.01}, "rounds to no block"),
                                      ({}, "set exactly one of blocks"), ({"blocks": 1, "fraction": 0.2}, "set exactly one")])
def test_depth_bad_amounts(tmp_path, opts, msg):
    m = load(str(_deep_llama(tmp_path)))
    with pytest.raises(Exception, match=msg):
        _apply(m, "depth", **opts, calib_samples=2, calib_seq_len=16)


def test_global_allocation_then_int4_reloads_bit_for_bit(tiny_llama, tmp_path, fast_recipe, monkeypatch):
    """Per-layer widths under quantized layers: the artifact slimctl writes reloads with the same outputs."""
    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.techniques import allocation

    monkeypatch.setattr(allocation, "allocate", lambda paths, budget: [16, 48])  # widths 112 and 80 (multiples of 8)

    steps = [{"method": "structured", "ffn": 0.25, "allocation": "global", "multiple_of": 8, **CAL}, {"method": "rtn", "bits": 4, "group_size": 32}]
    rep = pipeline.run(R.load(fast_recipe(steps)), str(tiny_llama), tmp_path / "o", isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"] is True and rep["artifact"]["loads_with"].startswith("slimctl")
    m = load(str(tmp_path / "o" / "model")).model
    assert m.config.slimctl_layer_sizes["intermediate_size"] == [layer.mlp.down_proj.in_features for layer in m.model.layers]


def test_output_fisher_is_the_mean_squared_loss_gradient_at_each_block_output(tiny_llama):
    from slimctl.techniques.allocation import output_fisher

    m = load(str(tiny_llama))
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2023, 2003]])
    fisher = output_fisher(m.model, [{"input_ids": ids}])
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in m.model.model.layers]
    h = m.model.model.embed_tokens(ids).detach().requires_grad_(True)
    loss = m.model(inputs_embeds=h, labels=ids).loss * (ids.numel() - 1)
    grads = torch.autograd.grad(loss, outs)
    for hk in hooks:
        hk.remove()
    for f, g in zip(fisher, grads):
        assert torch.allclose(f, (g[0] ** 2).mean(0), rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in m.model.parameters())  # left as it found them
