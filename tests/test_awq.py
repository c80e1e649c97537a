"""AWQ (exact folds, beats RTN), per-Linear sensitivity and the mixed allocation (budget, reload)."""
import copy
import itertools
import random

import pytest
import torch

from slimctl import techniques as T
from slimctl.errors import RecipeError
from slimctl.models import load
from slimctl.quant.layers import WeightOnlyLinear, bits_per_weight
from slimctl.techniques.sensitivity import allocate


def _ctx(path):
    m = load(str(path))
    return m, T.StepContext(kind=m.kind, tokenizer=m.tokenizer)


def _logits(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_awq_folds_are_exact_before_quantization(fixture, request):
    """Scales folded into norms / v_proj (GQA: 4 query heads on 2 kv heads) / up_proj leave the function unchanged."""
    m, ctx = _ctx(request.getfixturevalue(fixture))
    ref = copy.deepcopy(m.model)
    awq = T.get("awq")
    stats = awq.apply(m.model, awq.config(bits=4, group_size=32, calib_samples=4, calib_seq_len=32, clip=False,
                                          quantize=False), ctx)
    folds = [f for b in stats["blocks"].values() for f in b["folds"].values()]
    assert folds and any(f["alpha"] > 0 for f in folds), "some scale must differ from 1 for the test to mean anything"
    if fixture == "tiny_llama":
        assert all("self_attn.v_proj" in b["folds"] for b in stats["blocks"].values())  # the GQA fold
    else:
        assert stats["folds_skipped"] and any("GELU" in s for s in stats["folds_skipped"])
    moved = max(float((a - b).abs().max()) for a, b in zip(ref.state_dict().values(), m.model.state_dict().values()))
    assert moved > 1e-3  # the weights did change
    ids = torch.randint(1000, 5000, (2, 24))
    a, b = _logits(ref, ids), _logits(m.model, ids)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _with_outliers(model, factor=30.0, channels=(3, 17, 40)):
    """Activation outliers as real LLMs have them: a few norm channels ×factor, the columns that read
    them ÷factor (the same function; the scaled-down weight columns are what rounding then crushes)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                               (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                parent = layer.self_attn if lins[0] == "q_proj" else layer.mlp
                for c in channels:
                    norm.weight[c] *= factor
                    for n in lins:
                        getattr(parent, n).weight[:, c] /= factor
    return model


def _calibration_kl(ref, model, batches):
    total = n = 0
    with torch.inference_mode():
        for b in batches:
            p = ref(**b).logits.log_softmax(-1)
            q = model(**b).logits.log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            n += p.shape[1]
    return total / n


def test_awq_beats_rtn_at_the_same_group_on_calibration_loss(tiny_llama):
    m, ctx = _ctx(tiny_llama)
    base = _with_outliers(m.model)
    cfg = dict(bits=4, group_size=32)
    awq_cfg = T.get("awq").config(**cfg, calib_samples=8, calib_seq_len=64)
    batches = awq_cfg.batches(ctx)
    rtn_model, awq_model = copy.deepcopy(base), copy.deepcopy(base)
    T.get("rtn").apply(rtn_model, T.get("rtn").config(**cfg), ctx)
    stats = T.get("awq").apply(awq_model, awq_cfg, ctx)
    assert sum(isinstance(x, WeightOnlyLinear) for x in awq_model.modules()) == len(stats["layers"])
    rtn_kl, awq_kl = _calibration_kl(base, rtn_model, batches), _calibration_kl(base, awq_model, batches)
    assert awq_kl < 0.8 * rtn_kl, (awq_kl, rtn_kl)
    assert stats["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # int4 codes + a float32 scale per 32


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_awq_calibrates_each_block_on_what_propagate_names(tiny_llama, propagate):
    """propagate: float (llm-compressor's way) feeds block 1 the float model's block-0 output; quantized feeds
    it block 0's output after clipping and rounding."""
    m, ctx = _ctx(tiny_llama)
    cfg = T.get("awq").config(bits=4, group_size=32, calib_samples=2, calib_seq_len=32, propagate=propagate)
    batches = cfg.batches(ctx)
    with torch.inference_mode():
        want = [m.model(**b, output_hidden_states=True).hidden_states[1] for b in batches]
    seen = []
    hook = m.model.model.layers[1].register_forward_pre_hook(
        lambda mod, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    T.get("awq").apply(m.model, cfg, ctx)
    hook.remove()
    # block 1's first call is awq_block's reference run on the first batch (texts of equal length run stacked)
    first = torch.cat(want[:seen[0].shape[0]])
    assert seen[0].shape == first.shape
    assert torch.allclose(seen[0], first, atol=1e-5) == (propagate == "float")


def test_awq_then_gptq_composes_and_checks_the_grid(tiny_llama, fast_recipe, tmp_path):
    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    r = R.load(fast_recipe([{"method": "awq", "calib_samples": 2, "calib_seq_len": 32},
                            {"method": "gptq", "bits": 4, "group_size": 16, "calib_samples": 2, "calib_seq_len": 32}]))
    awq = r.steps[0].config
    assert (awq.quantize, awq.group_size, awq.bits) == (False, 16, 4)  # searches for the grid GPTQ rounds to
    rep = pipeline.run(r, str(tiny_llama), tmp_path / "o", isolate=False)
    steps = rep["slimmed"]["steps"]
    assert [s["method"] for s in steps] == ["awq", "gptq"] and steps[0]["quantized"] is False
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    with pytest.raises(RecipeError, match="group_size 64 differs"):
        R.load(fast_recipe([{"method": "awq", "group_size": 64}, {"method": "gptq", "group_size": 32}], name="bad"))
    with pytest.raises(RecipeError, match="at most one quantization step"):
        R.load(fast_recipe([{"method": "gptq"}, {"method": "awq"}], name="bad2"))


def _brute_force(bits, costs, weights, avg):
    names = list(bits)
    best = None
    for combo in itertools.product(*(list(bits[n]) for n in names)):
        used = sum(bits[n][c] for n, c in zip(names, combo))
        if used <= avg * sum(weights.values()):
            cost = sum(costs[n][c] for n, c in zip(names, combo))
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_never_exceeds_the_budget_and_is_near_optimal(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(7)]
    weights = {n: rng.choice([64, 128, 256]) * 64 for n in names}
    bits = {n: {"int4": int(weights[n] * 4.5), "int8": int(weights[n] * 8.06), "float": weights[n] * 32} for n in names}
    costs = {n: {"int4": rng.uniform(0.01, 1), "int8": rng.uniform(0, 0.01), "float": 0.0} for n in names}
    for avg in (4.5, 5.0, 6.3, 9.0, 32):
        pick = allocate(bits, costs, weights, avg)
        used = sum(bits[n][pick[n]] for n in names)
        assert used <= avg * sum(weights.values())
        got = sum(costs[n][pick[n]] for n in names)
        assert got <= _brute_force(bits, costs, weights, avg) * 1.5 + 1e-9
    assert all(c == "float" for c in allocate(bits, costs, weights, 32).values())
    with pytest.raises(RecipeError, match="below the smallest possible"):
        allocate(bits, costs, weights, 4.0)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-scales", "fp16-scales"])
def test_mixed_respects_the_budget_and_reloads_bitwise(tiny_llama, fast_recipe, tmp_path, fp16):
    """int4 g32 is 5 bits with float32 scales, 4.5 with fp16 ones (stored in 16 bits); 6 bits buy some int8."""
    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    r = R.load(fast_recipe([{"method": "mixed", "avg_bits": 6.0, "group_size": 32, "quantizer": "rtn", "fp16_scales": fp16,
                             "sensitivity_samples": 2, "sensitivity_seq_len": 32}]))
    rep = pipeline.run(r, str(tiny_llama), tmp_path / "o", isolate=False)
    step = rep["slimmed"]["steps"][0]
    alloc = step["allocation"]
    assert set(alloc.values()) == {"int4-g32", "int8"}, alloc  # some int8 layers, not all
    assert (4.5 if fp16 else 5.0) < step["bits_per_weight"] <= 6.0
    assert step["bits_per_weight"] > 5.6  # the allocator counts the scales as stored: the budget is nearly spent
    cost = step["sensitivity"]
    assert all(set(v) == {"int4-g32", "int8"} and min(v.values()) >= 0 for v in cost.values())
    assert sum(v["int8"] for v in cost.values()) < 0.1 * sum(v["int4-g32"] for v in cost.values())
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    reloaded = load(str(tmp_path / "o" / "model")).model
    widths = {n: m.bits for n, m in reloaded.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert widths == {n: (8 if c == "int8" else 4) for n, c in alloc.items()}
    assert bits_per_weight(reloaded, list(alloc)) == step["bits_per_weight"]


def test_mixed_chooses_among_several_int4_groups(tiny_llama, fast_recipe, tmp_path):
    """group_sizes [64, 32]: int4 g64 (4.5 bits), int4 g32 (5 bits) or int8 per Linear under 5.2 bits;
    each Linear reloads at the width and group it was given, bit for bit."""
    from slimctl.workflow import pipeline
    from slimctl import recipe as R

    r = R.load(fast_recipe([{"method": "mixed", "avg_bits": 5.2, "group_sizes": [64, 32], "quantizer": "rtn",
                             "sensitivity_samples": 2, "sensitivity_seq_len": 32}]))
    rep = pipeline.run(r, str(tiny_llama), tmp_path / "o", isolate=False)
    step = rep["slimmed"]["steps"][0]
    alloc = step["allocation"]
    assert set(alloc.values()) <= {"int4-g64", "int4-g32", "int8"} and "int4-g64" in set(alloc.values())
    assert len(set(alloc.values())) >= 2, alloc  # 5.2 bits buy finer groups or int8 for some Linears, not all
    assert all(set(v) == {"int4-g64", "int4-g32", "int8"} for v in step["sensitivity"].values())
    assert 4.5 < step["bits_per_weight"] <= 5.2
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    reloaded = load(str(tmp_path / "o" / "model")).model
    got = {n: (m.bits, m.group_size) for n, m in reloaded.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert got == {n: (8, step["groups"][n]) if c == "int8" else (4, int(c.split("-g")[1])) for n, c in alloc.items()}


def test_sensitivity_replay_gives_the_costs_of_a_full_forward(tiny_llama):
    """Starting at the Linear's block (earlier blocks replaying their float outputs) changes nothing."""
    from slimctl.quant.integer import QScheme, dequantize_groups, rtn
    from slimctl.techniques.sensitivity import _Replay, _cost

    m, ctx = _ctx(tiny_llama)
    batches = T.get("gptq").config(calib_samples=2, calib_seq_len=32).batches(ctx)
    replay = _Replay(m.model, batches)
    name = "model.layers.1.mlp.down_proj"
    assert replay.first_block(name) == 1 and replay.first_block("lm_head") == 0
    lin = m.model.get_submodule(name)
    with torch.no_grad():
        lin.weight.copy_(dequantize_groups(*rtn(lin.weight.float(), QScheme(4, 32), 32), 32))
    skipped, full = _cost(m.model, batches, replay, 1, True), _cost(m.model, batches, replay, 0, True)
    assert full > 0 and skipped == pytest.approx(full, rel=1e-4)
    assert all("forward" not in vars(b) for b in replay.blocks)  # the replay left no patched forward behind


@pytest.mark.parametrize("curve, same", [
    (lambda a: (a - 0.63) ** 2, True),  # one minimum: refine finds the full grid's α
    (lambda a: abs(a - 0.05), True),  # at the low end of the grid
    (lambda a: abs(a - 0.95), True),  # at the high end
    (lambda a: 1.0, True),  # all equal: the earliest point, as a full scan keeps it
    (lambda a: min((a - 0.2) ** 2 + 1e-3, (a - 0.75) ** 2), False),  # two minima: refine may keep the coarse one's
])
def test_awq_refined_grid_scores_fewer_alphas_and_finds_a_single_minimum(curve, same):
    from slimctl.techniques.awq import AWQConfig, _grid_losses

    for stride in (2, 4):
        cfg = AWQConfig(grid_search="refine", refine_stride=stride)
        points = [0.0] + [k / cfg.grid for k in range(cfg.grid)]  # s = 1 first, then the α grid
        scored = []

        def score(i):
            scored.append(i)
            return 5.0 if i == 0 else curve(points[i])

        refined = _grid_losses(score, len(points), 1, cfg)
        full = _grid_losses(lambda i: 5.0 if i == 0 else curve(points[i]), len(points), 1, cfg.model_copy(update={"grid_search": "full"}))
        assert len(full) == 21 and len(scored) == len(set(scored)) < 21 and len(refined) == len(scored)
        pick = [min(d, key=lambda i: (d[i], i)) for d in (refined, full)]
        if same:
            assert pick[0] == pick[1], (stride, pick)
        assert all(refined[i] == full[i] for i in refined)  # the same losses where both scored
    assert len(scored) <= 13  # stride 4: the coarse 5 points, s = 1 and at most 6 between


def test_awq_refined_grid_default_is_full_and_refine_runs(tiny_llama):
    """The default scores the whole grid (AutoAWQ's search, the figures in the docs); refine runs end to end and
    scores fewer α's than the full grid on a real block."""
    from slimctl.techniques import awq

    assert awq.AWQConfig().grid_search == "full"
    m, ctx = _ctx(tiny_llama)
    calls = {"n": 0}
    real = awq._loss

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    counts = {}
    for mode in ("full", "refine"):
        calls["n"] = 0
        model = copy.deepcopy(m.model)
        cfg = T.get("awq").config(bits=4, group_size=32, calib_samples=4, calib_seq_len=32, grid_search=mode)
        awq._loss, saved = counting, awq._loss
        try:
            stats = T.get("awq").apply(model, cfg, ctx)
        finally:
            awq._loss = saved
        counts[mode] = calls["n"]
        assert stats["layers"]
    assert 0 < counts["refine"] < 0.7 * counts["full"], counts


def test_mixed_estimates_its_costs_with_the_sensitivity_rounding_and_quantizes_with_its_own(tiny_llama, monkeypatch):
    """sensitivity_scale_search: the Fisher pass rounds with it (cheap), the chosen format is then quantized with
    scale_search; unset, both are scale_search."""
    from slimctl.quant import integer
    from slimctl.techniques import mixed

    cfg = T.get("mixed").config(avg_bits=6.0, group_size=32, quantizer="rtn", fp16_scales=True, scale_search="mse",
                                sensitivity_scale_search="signed", sensitivity_samples=2, sensitivity_seq_len=32)
    assert {c.scheme.scale_search for c in mixed._choices(cfg).values()} == {"signed"}
    assert {c.scheme.scale_search for c in mixed._choices(cfg.model_copy(update={"sensitivity_scale_search": None})).values()} == {"mse"}
    seen = []
    real = integer.group_params

    def spy(w, scheme, *a, **k):
        seen.append(scheme.scale_search)
        return real(w, scheme, *a, **k)

    monkeypatch.setattr(integer, "group_params", spy)
    m, ctx = _ctx(tiny_llama)
    stats = T.get("mixed").apply(m.model, cfg, ctx)
    assert stats["allocation"] and "signed" in seen and "mse" in seen  # costs with signed, the artifact with mse
