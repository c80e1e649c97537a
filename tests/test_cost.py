"""The cost of slimming: each speed-up of the calibrated methods gives the result it replaced (bit for bit, or
within float rounding where the sums run in another order), the Fisher sensitivity estimate agrees with the
measured costs, and a step's time breakdown is recorded."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimctl import techniques as T
from slimctl.techniques.calibrate import stack
from slimctl.techniques.hessian import InputStats, collect
from slimctl.models import load


def _ctx(path):
    m = load(str(path))
    return m, T.StepContext(kind=m.kind, tokenizer=m.tokenizer)


class _Readers(nn.Module):
    """Two Linears reading one input (a norm's readers), one reading another; `split` makes b read a copy."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)
        self.split = False

    def forward(self, x):
        return self.c(self.a(x) + self.b(x.clone() if self.split else x))


def _alone(layers: dict, xs: list[torch.Tensor], mod: _Readers, split_at: int) -> InputStats:
    stats = InputStats(layers, hessian=True, share=False)
    with torch.no_grad():
        for i, x in enumerate(xs):
            mod.split = i >= split_at
            mod(x)
    return stats.finish()


@pytest.mark.parametrize("split_at", [99, 1])
def test_readers_of_one_input_share_statistics_and_a_broken_share_is_counted_again(split_at):
    torch.manual_seed(0)
    mod, xs = _Readers(), [torch.randn(5, 8) for _ in range(3)]
    layers = {"a": mod.a, "b": mod.b, "c": mod.c}

    def run():
        with torch.no_grad():
            for i, x in enumerate(xs):
                mod.split = i >= split_at
                mod(x)

    shared, alone = collect(layers, run, hessian=True), _alone(layers, xs, mod, split_at)
    assert shared.broken is False
    assert (shared.hessian["a"] is shared.hessian["b"]) == (split_at == 99)  # one X^T X for a and b
    for n in layers:
        assert shared.n[n] == alone.n[n] == 15
        torch.testing.assert_close(shared.hessian[n], alone.hessian[n], rtol=0, atol=0)
        torch.testing.assert_close(shared.sq_norm[n], alone.sq_norm[n], rtol=0, atol=0)


def test_stacking_keeps_the_order_and_only_stacks_runs_of_one_length():
    def text(n, v):
        return {"input_ids": torch.full((1, n), v), "attention_mask": torch.ones(1, n, dtype=torch.long)}

    batches = [text(4, 0), text(4, 1), text(4, 2), text(3, 3), text(4, 4)]
    out = stack(batches, max_tokens=8)
    assert [b["input_ids"][:, 0].tolist() for b in out] == [[0, 1], [2], [3], [4]]
    assert [len(b["input_ids"]) for b in stack(batches[:3], max_tokens=8, breaks=(1,))] == [1, 2]
    assert stack([{"input_ids": torch.zeros(2, 4)}], 8)[0]["input_ids"].shape == (2, 4)  # already batched: as given


def test_gptq_of_layers_sharing_a_hessian_solved_together_equals_each_alone():
    from slimctl.quant.integer import QScheme
    from slimctl.techniques.gptq import gptq_quantize

    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.2, 3, 64)
    h = 2 * x.T @ x / 512
    ws = [torch.randn(n, 64) for n in (32, 16, 16)]
    sch = QScheme(4, 16, False)
    together = gptq_quantize(torch.cat(ws), h, sch, 16, 0.01, False, 32)
    rows = 0
    for w in ws:
        alone = gptq_quantize(w, h, sch, 16, 0.01, False, 32)
        part = slice(rows, rows + w.shape[0])
        rows += w.shape[0]
        same = (together[0][part] == alone[0]).float().mean()
        assert same > 0.999, same  # a code may flip where float rounding of the sums differs
        torch.testing.assert_close(together[1][part], alone[1], rtol=1e-5, atol=1e-6)


def test_gptq_two_level_column_loop_gives_the_reference_loop_codes():
    """The published loop (one lazy block, every column's error spread over the rest of the block at once)
    written plainly here; slimctl's sub-block version must give the same codes."""
    from slimctl.techniques.hessian import hessian_start, inverse_hessian_factor
    from slimctl.quant.integer import QScheme, dequantize_with, group_params, quantize_with
    from slimctl.techniques.gptq import gptq_quantize

    torch.manual_seed(1)
    x = torch.randn(256, 128) * torch.linspace(0.1, 2, 128)
    w0 = torch.randn(24, 128)
    sch = QScheme(4, 32, True)
    w, h = hessian_start(w0, 2 * x.T @ x / 256)
    hinv = inverse_hessian_factor(h, 0.01)
    q, scale = torch.zeros_like(w), torch.zeros(24, 4)
    for i1 in range(0, 128, 64):
        w1, err1, hinv1 = w[:, i1:i1 + 64].clone(), torch.zeros(24, 64), hinv[i1:i1 + 64, i1:i1 + 64]
        for i in range(64):
            if (i1 + i) % 32 == 0:
                scale[:, (i1 + i) // 32] = group_params(w1[:, i:i + 32], sch)[0]
            s = scale[:, (i1 + i) // 32]
            cq = quantize_with(w1[:, i:i + 1], s, None, sch)
            q[:, i1 + i] = cq[:, 0]
            e = (w1[:, i] - dequantize_with(cq, s, None)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i:i + 1, i:]
            err1[:, i] = e
        w[:, i1 + 64:] -= err1 @ hinv[i1:i1 + 64, i1 + 64:]
    codes, got_scale, _ = gptq_quantize(w0, 2 * x.T @ x / 256, sch, 32, 0.01, False, 64)
    assert (codes == q).float().mean() > 0.999
    torch.testing.assert_close(got_scale, scale, rtol=1e-5, atol=1e-7)


def test_inverse_factor_from_one_cholesky_and_a_triangular_inverse_equals_the_three_step_factor(monkeypatch):
    import slimctl.techniques.hessian as C

    monkeypatch.setattr(C, "SCIPY_MIN_WIDTH", 0)  # the scipy path (wide Hessians only) on a small one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g) * torch.linspace(0.1, 3, 96)
    h = 2 * x.T @ x / 300
    lam = 0.01 * float(h.diag().mean())
    u = C.upper_inverse_factor(h, lam)
    monkeypatch.setattr(C, "_trtri", lambda h: None)  # the Cholesky, inverse, Cholesky path (scipy missing)
    ref = C.upper_inverse_factor(h, lam)
    assert torch.equal(u, u.triu()) and torch.allclose(u, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    hd = h + lam * torch.eye(96)
    assert torch.allclose(u.T @ u @ hd, torch.eye(96), atol=1e-3)


def test_hessian_by_symmetric_rank_k_updates_equals_the_gemm_sum(monkeypatch):
    import slimctl.techniques.hessian as C

    monkeypatch.setattr(C, "SCIPY_MIN_WIDTH", 0)  # the scipy path (wide inputs only) on a small one
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(40, 3)
    xs = [torch.randn(2, 9, 40, generator=g), torch.randn(1, 5, 40, generator=g) * 3]
    fast = collect({"l": lin}, lambda: [lin(x) for x in xs], hessian=True).hessian["l"]
    monkeypatch.setattr(C, "_syrk", lambda x: None)
    ref = collect({"l": lin}, lambda: [lin(x) for x in xs], hessian=True).hessian["l"]
    assert torch.equal(fast, fast.T) and torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)
    x = torch.cat([x.reshape(-1, 40) for x in xs])
    assert torch.allclose(ref, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [40, 200, 576])
def test_hessian_from_blocks_of_its_lower_triangle_equals_the_full_gemm(width):
    """XᵀX accumulated by row blocks of its lower triangle (about 9/16 of the flops), mirrored at the end, equals
    the full product; widths that the blocks divide and do not."""
    import slimctl.techniques.hessian as C

    g = torch.Generator().manual_seed(width)
    lin = nn.Linear(width, 3)
    xs = [torch.randn(2, 9, width, generator=g), torch.randn(1, 5, width, generator=g) * 3]
    h = collect({"l": lin}, lambda: [lin(x) for x in xs], hessian=True).hessian["l"]
    x = torch.cat([x.reshape(-1, width) for x in xs])
    assert torch.equal(h, h.T) and torch.allclose(h, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    assert (C.lower_flops_share(width) < 0.7) == (width >= 128)


def test_scipy_routines_only_for_wide_matrices():
    """Below SCIPY_MIN_WIDTH torch's own GEMM and Cholesky run (scipy's OpenBLAS threads would contend with torch's)."""
    import slimctl.techniques.hessian as C

    assert C._syrk(torch.zeros(8, C.SCIPY_MIN_WIDTH - 1)) is None and C._trtri(torch.eye(64)) is None


def test_output_energy_counted_in_the_forward_is_the_trace_form():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(16, 5)
    xs = [torch.randn(2, 7, 16, generator=g), torch.randn(1, 4, 16, generator=g)]
    stats = collect({"l": lin}, lambda: [lin(x) for x in xs], hessian=True)
    w = lin.weight.detach()
    assert stats.out_energy["l"] == pytest.approx(float(((w @ stats.hessian["l"]) * w).sum()), rel=1e-5)


def test_gptq_output_error_from_its_own_loss_equals_the_trace_form(tiny_llama, monkeypatch):
    """The relative output error GPTQ records (its row loss less the dampening's share, over the output energy)
    is ‖(W − Ŵ)X‖² / ‖WX‖² as the trace form with H computes it, layer by layer, with never-seen inputs."""
    import slimctl.techniques.gptq as G
    from slimctl.techniques.hessian import relative_output_error

    m, ctx = _ctx(tiny_llama)
    pairs, real = [], G.output_error

    def both(w, w_hat, h, record, rows, energy):
        got = real(w, w_hat, h, record, rows, energy)
        pairs.append((got, relative_output_error(w, w_hat, h)))
        return got

    monkeypatch.setattr(G, "output_error", both)
    stats = T.get("gptq").apply(m.model, T.get("gptq").config(bits=4, group_size=32, calib_samples=4, act_order=True), ctx)
    assert len(pairs) == len(stats["relative_output_error"]) > 0
    for got, ref in pairs:
        assert got == pytest.approx(ref, rel=1e-3, abs=1e-7)
    assert max(ref for _, ref in pairs) > 1e-4  # the check compares errors that are there


def test_clip_search_by_gram_matrices_picks_the_explicit_products_ranges():
    from slimctl.quant.integer import QScheme
    from slimctl.techniques.awq import _pseudo, clip_range

    torch.manual_seed(2)
    w, x = torch.randn(24, 64), torch.randn(300, 64) * 2
    sch = QScheme(4, 16, True)
    got = clip_range(w, x, sch, 20, 0.5)
    wg, xg = w.reshape(24, 4, 16), x.reshape(-1, 4, 16).transpose(0, 1)
    org = torch.bmm(xg, wg.permute(1, 2, 0))
    amax = wg.abs().amax(-1)
    best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for k in range(10):  # AutoAWQ's search: the outputs themselves compared
        mx = amax * (1 - k / 20)
        q = _pseudo(torch.maximum(torch.minimum(wg, mx[..., None]), -mx[..., None]).reshape(24, 64), sch).reshape(24, 4, 16)
        err = (torch.bmm(xg, q.permute(1, 2, 0)) - org).pow(2).mean(1).T
        better = err < best_err
        best_err[better], best[better] = err[better], mx[better]
    assert (got == best).float().mean() > 0.99


def test_dequantized_once_gives_the_per_call_outputs(tiny_llama):
    from slimctl.quant.layers import WeightOnlyLinear, dequantized_once

    m, ctx = _ctx(tiny_llama)
    T.get("rtn").apply(m.model, T.get("rtn").config(bits=4, group_size=32), ctx)
    lin = next(x for x in m.model.modules() if isinstance(x, WeightOnlyLinear))
    x = torch.randn(3, lin.in_features)
    with torch.no_grad():
        plain = lin(x)
        with dequantized_once(m.model):
            once, again = lin(x), lin(x)
        assert lin._once is None
    assert torch.equal(plain, once) and torch.equal(plain, again)


def test_fisher_costs_rank_the_layers_as_the_measured_costs_do(tiny_llama):
    """The Fisher estimate of each Linear's KL and the KL measured by quantizing it alone, on the same texts:
    same order of magnitude and rank-correlated over layers and formats."""
    from slimctl.techniques.fisher import fisher_costs
    from slimctl.quant.integer import QScheme
    from slimctl.techniques.sensitivity import Choice, layer_costs
    from slimctl.techniques import select_linears

    m, ctx = _ctx(tiny_llama)
    targets = dict(select_linears(m.model, []))
    choices = {"int4-g16": Choice("int4", QScheme(4, 16)), "int3-g32": Choice("int3", QScheme(3, 32)),
               "float": Choice("float", None)}
    per = {n: choices for n in targets}
    groups = {n: {"int4-g16": 16, "int3-g32": 32, "float": None} for n in targets}
    batches = T.get("mixed").config().model_copy(update={"calib_samples": 4}).batches(ctx)
    est = fisher_costs(m.model, targets, per, groups, batches, seed=0, draws=16)
    meas = layer_costs(m.model, targets, per, groups, batches, True)
    a = torch.tensor([est[n][c] for n in targets for c in ("int4-g16", "int3-g32")])
    b = torch.tensor([meas[n][c] for n in targets for c in ("int4-g16", "int3-g32")])
    assert all(est[n]["float"] == 0 for n in targets)
    assert 0.3 < float(a.sum() / b.sum()) < 3, (a.sum(), b.sum())
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    spearman = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert spearman > 0.7, spearman
    assert all(p.requires_grad for p in m.model.parameters())  # flags restored


def test_a_calibrated_step_records_where_its_time_went(tiny_llama):
    from slimctl.recipe import from_dict
    from slimctl.steps import UI, apply_steps

    m = load(str(tiny_llama))
    recipe = from_dict({"version": 1, "steps": [{"method": "gptq", "group_size": 32, "calib_samples": 4,
                                                   "calib_seq_len": 32}]}, "test")
    _, steps, _ = apply_steps(copy.deepcopy(m.model), m.tokenizer, recipe, m.kind, UI())
    rows = {r.stage: r for r in steps[0].time_breakdown}
    assert {"calibration forward", "input statistics", "hessian factorisation", "solve", "other"} <= set(rows)
    assert rows["input statistics"].gflop > 0 and rows["solve"].seconds > 0
    assert sum(r.seconds for r in rows.values()) == pytest.approx(steps[0].seconds, rel=0.05, abs=0.01)


def test_bfloat16_calibration_forwards_keep_the_hessians_within_two_percent(tiny_llama, monkeypatch):
    """calib_dtype bfloat16 runs the blocks under bf16 autocast: GPTQ's record says so, every Hessian stays within
    2 % (Frobenius) of the float32 one (bf16 keeps 8 bits of mantissa), and the layers come out nearly the same; `auto` follows the CPU's flags."""
    from slimctl.recipe import from_dict
    from slimctl.steps import UI, apply_steps
    from slimctl.techniques import hessian, precision

    m = load(str(tiny_llama))
    seen: dict[str, list] = {}
    real = hessian.InputStats.finish

    def keep(self):
        out = real(self)
        seen.setdefault(precision._AUTOCAST.get() or torch.float32, []).append(dict(self.hessian))
        return out

    monkeypatch.setattr(hessian.InputStats, "finish", keep)
    steps = {}
    for dtype in ("float32", "bfloat16"):
        recipe = from_dict({"version": 1, "steps": [{"method": "gptq", "group_size": 32, "calib_samples": 4,
                                                       "calib_seq_len": 32, "calib_dtype": dtype}]}, "test")
        _, steps[dtype], _ = apply_steps(copy.deepcopy(m.model), m.tokenizer, recipe, m.kind, UI())
    assert steps["bfloat16"][0].calibration_precision == "bfloat16" and steps["float32"][0].calibration_precision is None
    for h32, h16 in zip(seen[torch.float32], seen[torch.bfloat16]):
        for name in h32:
            assert float((h16[name] - h32[name]).norm() / h32[name].norm()) < 0.02, name
    e32, e16 = (steps[d][0].relative_output_error for d in ("float32", "bfloat16"))
    assert all(abs(e16[n] - e32[n]) <= 0.1 * e32[n] + 1e-6 for n in e32)
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.resolve("auto") == "float32"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolve("auto") == "bfloat16"


def test_auto_calibration_precision_keeps_awq_in_float32_and_lets_gptq_run_bfloat16(tiny_llama, monkeypatch):
    """On a CPU with native bf16, `auto` runs GPTQ's forwards in bf16 but AWQ's in float32 (its α grid compares losses
    finer than bf16's rounding); each step's record says what ran."""
    from slimctl.recipe import from_dict
    from slimctl.steps import UI, apply_steps
    from slimctl.techniques import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    m = load(str(tiny_llama))
    cal = {"calib_samples": 2, "calib_seq_len": 32, "calib_dtype": "auto"}
    recipe = from_dict({"version": 1, "steps": [{"method": "awq", **cal},
                                                {"method": "gptq", "group_size": 32, **cal}]}, "test")
    _, steps, _ = apply_steps(m.model, m.tokenizer, recipe, m.kind, UI())
    assert steps[0].calibration_precision is None and steps[1].calibration_precision == "bfloat16"


def test_fisher_costs_are_the_same_with_the_rounding_errors_kept_between_draws_or_recomputed(tiny_llama, monkeypatch):
    from slimctl.quant.integer import QScheme
    from slimctl.techniques import fisher, select_linears
    from slimctl.techniques.sensitivity import Choice

    m, ctx = _ctx(tiny_llama)
    targets = dict(select_linears(m.model, []))
    choices = {"int4-g16": Choice("int4", QScheme(4, 16)), "int8": Choice("int8", QScheme(8, None))}
    per = {n: choices for n in targets}
    groups = {n: {"int4-g16": 16, "int8": targets[n].in_features} for n in targets}
    batches = T.get("mixed").config().model_copy(update={"calib_samples": 2}).batches(ctx)
    kept = fisher.fisher_costs(m.model, targets, per, groups, batches, seed=0, draws=3)
    monkeypatch.setattr(fisher._Hooks, "CACHE_BYTES", 0)  # only the latest ΔW kept: recomputed at every draw
    assert fisher.fisher_costs(m.model, targets, per, groups, batches, seed=0, draws=3) == kept
    monkeypatch.setattr(fisher._Hooks, "PRODUCT_BYTES", 0)  # x ΔWᵀ recomputed at every draw too
    assert fisher.fisher_costs(m.model, targets, per, groups, batches, seed=0, draws=3) == kept
