"""A bench study: fresh-process rounds of one model (and optionally its data-free slimmed variant), an optional
sweep across batch sizes and dtypes, the cost and placement that follow, and the warnings the numbers imply."""
from __future__ import annotations

import functools
from typing import Any
from ..errors import UsageError
from ..kinds import CAUSAL_LM
from ..results.report import BenchResult
from ..results.study import (BenchStudy, ConfigOnly, DeviceStudies, SemiStructured, SweepRow,
                             VariantRatios)
from ..specs import BenchSpec
from .catalogue import config_folder, params_from_config
from .cost import cost, placement
from .sweep import recommend, sweep


def study(target: str, spec: BenchSpec, *, config_only: bool = False, sizes: list[int] | str | None = None,
          dtypes: list[str] | None = None, max_memory_mb: float | None = None, slo_p95_ms: float | None = None,
          hourly_usd: float | None = None, repeats: int = 3, inline: bool = False, load_options: dict | None = None,
          steps: list[dict[str, Any]] | None = None, variant: list[dict[str, Any]] | None = None,
          say=lambda m: None) -> BenchStudy:
    """What `slimctl bench` reports: one point measured `repeats` times in fresh processes (the
    spread says how far apart two benches of the same model fall), or a sweep across batch sizes and
    dtypes with a recommendation; roofline fractions and cost for the headline result.

    With `variant` (data-free recipe steps) the single point is measured for the model and for its
    slimmed variant in alternating rounds (bench.alternate, as `slimctl run` does); the variant's
    result goes under "slimmed"."""
    import tempfile

    from ..models import kind_of, resolve

    with tempfile.TemporaryDirectory(prefix="slimctl-bench-") as tmp:
        folder = config_folder(target, tmp) if config_only else resolve(target, say)[0]
        kind = CAUSAL_LM if config_only else kind_of(folder)
        dtypes = dtypes or [None]
        if inline and (len(dtypes) > 1 or config_only or steps or variant):
            raise UsageError("--inline measures one loaded model: drop --dtypes / --config / --recipe, or run isolated")
        if variant and sizes is not None:
            raise UsageError("a slimmed variant (--recipe) is measured at one point: drop --batch-sizes")

        def measure(s: BenchSpec, dtype: str | None, roofline: bool = False, with_steps=steps) -> BenchResult:
            from .runner import bench_isolated

            if inline:
                return _inline(str(folder), s, load_options or {}, roofline)
            return bench_isolated(str(folder), s.model_copy(update={"roofline": roofline}), load_options=load_options,
                                  dtype=dtype, config_only=config_only, max_memory_mb=max_memory_mb, steps=with_steps)

        out = _header(target, kind, spec, inline, steps, config_only, folder)
        best = None
        if sizes is not None:
            best = _sweep_point(out, measure, spec, sizes, dtypes, kind, max_memory_mb, slo_p95_ms, hourly_usd, say)
        else:
            base, slimmed = _rounds(measure, spec, dtypes[0], 1 if inline else repeats, variant, say)
            out.bench = _headline(base)
            if variant:
                slim = _header(target, kind, spec, inline, variant, config_only, folder)
                slim.bench = _headline(slimmed)
                out.slimmed = _finish(slim, functools.partial(measure, with_steps=variant), spec, dtypes, kind,
                                      hourly_usd, sizes, None, say)
        _finish(out, measure, spec, dtypes, kind, hourly_usd, sizes, best, say)
    return out


def _header(target: str, kind: str, spec: BenchSpec, inline: bool, steps, config_only: bool, folder) -> BenchStudy:
    out = BenchStudy(model=target, kind=kind, device=spec.device, isolated=not inline)
    if steps:
        out.steps = steps
    if config_only:
        out.config_only = ConfigOnly(architecture=target, parameters=params_from_config(folder),
                                     note="random-initialised weights: speed and memory only, no accuracy")
    return out


def _rounds(measure, spec: BenchSpec, dtype: str | None, repeats: int, variant, say) -> tuple[list[BenchResult], list[BenchResult]]:
    """`repeats` rounds of the model, alternating with rounds of its variant when there is one; the
    first round of each side also measures the roofline."""
    from .runner import alternate

    if variant:
        return alternate(lambda i: measure(spec, dtype, roofline=(i == 0)),
                         lambda i: measure(spec, dtype, roofline=(i == 0), with_steps=variant), repeats, say,
                         ("the model", "its slimmed variant"))
    rounds = []
    for i in range(repeats):
        say(f"round {i + 1}/{repeats}" + (" (fresh process)" if repeats > 1 else ""))
        rounds.append(measure(spec, dtype, roofline=(i == 0)))
    return rounds, []


def _headline(rounds: list[BenchResult]) -> BenchResult:
    """The rounds pooled; the roofline of the first, and the spread of the rounds' p50s."""
    from .runner import pool

    head = pool(rounds)
    head.roofline = rounds[0].roofline
    head.spread_p50_ms = [min(head.rounds_p50_ms), max(head.rounds_p50_ms)]
    return head


def _sweep_point(out: BenchStudy, measure, spec: BenchSpec, sizes, dtypes: list, kind: str, max_memory_mb,
                 slo_p95_ms, hourly_usd, say) -> SweepRow | None:
    """The batch-size (and dtype) sweep, its recommendation, and the roofline at the recommended point;
    returns the recommended row (None when no point ran)."""
    rows = []
    for dt in dtypes:
        rows += sweep(lambda s, dt=dt: measure(s, dt), spec, sizes, dt, max_memory_mb, say)
    rec = recommend(rows, slo_p95_ms)
    for r in rows:
        if r.status == "ok":
            r.cost = cost(r.result, kind == CAUSAL_LM, spec.device, hourly_usd)
    best = next((r for r in rows if rec and r.batch_size == rec.batch_size and r.dtype == rec.dtype), None)
    out.sweep, out.recommendation = rows, rec
    if best is not None:
        say(f"roofline at batch {best.batch_size}")
        out.bench = measure(spec.model_copy(update={"batch_size": best.batch_size}), best.cast, roofline=True)
    return best


def _finish(out: BenchStudy, measure, spec: BenchSpec, dtypes: list, kind: str, hourly_usd, sizes, best,
            say) -> BenchStudy:
    """The dense reference of a 2:4 point, the cost of the headline result, and the warnings."""
    if out.bench and spec.semi_structured:  # the same point dense, so the 2:4 gain is measured, not assumed
        say("dense reference for 2:4")
        cast = dtypes[0] if sizes is None else best.cast
        dense = measure(spec.model_copy(update={"semi_structured": False, "batch_size": out.bench.batch_size}), cast)
        sp, dn = out.bench.latency_ms.p50, dense.latency_ms.p50
        out.semi_structured = SemiStructured(layers=out.bench.semi_structured_layers, sparse_p50_ms=sp,
                                             dense_p50_ms=dn, speedup=dn / sp)
    if out.bench:
        out.cost = cost(out.bench, kind == CAUSAL_LM, spec.device, hourly_usd)
    out.warnings = _warnings(out, dtypes)
    return out


def data_free_steps(recipe_path: str) -> list[dict[str, Any]]:
    """A recipe's steps for a config-only model: random weights and no tokenizer, so methods that
    calibrate on text (GPTQ, SmoothQuant, Wanda, SparseGPT, structured, ONNX) are refused."""
    from .. import recipe as recipe_mod
    from ..techniques import CalibrationOptions

    r = recipe_mod.load(recipe_path)
    bad = [s.method for s in r.steps if isinstance(s.config, CalibrationOptions)]
    if bad:
        raise UsageError(f"{', '.join(bad)} calibrates on text, which a --config model (random weights, no tokenizer) does "
                         "not have; use a data-free recipe (bf16, int8-dynamic, int8-weight-only, int4-rtn-*, "
                         "prune-magnitude-*, nf4)")
    return [s.to_dict() for s in r.steps]


def variant_ratios(base: BenchStudy, slim: BenchStudy) -> VariantRatios:
    """Slimmed vs baseline of the same architecture: >1 speedups are faster, <1 memory ratios smaller."""
    b, s = base.bench, slim.bench
    if not b or not s:
        return VariantRatios()
    out = VariantRatios(speedup=b.latency_ms.p50 / s.latency_ms.p50,
                        weights_ratio=s.weights_in_memory_mb / b.weights_in_memory_mb,
                        peak_memory_ratio=s.peak_memory_mb / b.peak_memory_mb)
    if b.decode_tokens_per_s and s.decode_tokens_per_s:
        out.decode_speedup = s.decode_tokens_per_s / b.decode_tokens_per_s
        out.prefill_speedup = b.prefill_ms.p50 / s.prefill_ms.p50
    if b.spread_p50_ms and s.spread_p50_ms:
        out.within_noise = s.spread_p50_ms[0] <= b.spread_p50_ms[1] and b.spread_p50_ms[0] <= s.spread_p50_ms[1]
    return out


def study_devices(target: str, specs: dict[str, BenchSpec], prices: dict[str, float | None], *,
                  steps: list[dict[str, Any]] | None = None, recipe: str | None = None, slo_p95_ms: float | None = None,
                  say=lambda m: None, **kw) -> BenchStudy | DeviceStudies:
    """`study` on each device (one: its result; several: all of them plus a placement line), and with
    `steps` the slimmed variant of a config-only model next to its baseline on each device."""
    from ..results.report import Environment, environment

    by_device = {}
    for dev, spec in specs.items():
        if len(specs) > 1:
            say(f"measuring on {dev}")
        if steps:
            say(f"slimmed variant: {recipe} (alternating rounds with the model)")
        r = by_device[dev] = study(target, spec, slo_p95_ms=slo_p95_ms, hourly_usd=prices[dev], variant=steps, say=say, **kw)
        if steps:
            r.slimmed.recipe, r.slimmed.vs_baseline = recipe, variant_ratios(r, r.slimmed)
        r.environment = Environment.model_validate(environment(0, dev))
    if len(specs) == 1:
        return by_device[next(iter(specs))]
    return DeviceStudies(model=target, by_device=by_device, placement=placement(by_device, slo_p95_ms))


def _inline(folder: str, spec: BenchSpec, load_options: dict, roofline: bool) -> BenchResult:
    from ..models import load
    from .runner import bench_model

    loaded = load(folder, **load_options)
    return bench_model(loaded.model, loaded.tokenizer, loaded.kind, spec.model_copy(update={"roofline": roofline}), loaded.path)


def _warnings(out: BenchStudy, dtypes: list) -> list[str]:
    from .measure import cpu_flags

    w = []
    if out.device == "cpu" and any(d == "bf16" for d in dtypes):
        flags = cpu_flags()
        if not ({"amx_bf16", "avx512_bf16"} & flags):
            w.append("bf16 on a CPU without AMX or AVX512-BF16 runs through slow conversions; expect it slower than fp32")
    if out.device == "cpu" and any(d == "fp16" for d in dtypes):
        w.append("fp16 on CPU is emulated by most kernels; bf16 is the CPU's half precision")
    b = out.bench
    if b is not None:
        w.extend(b.notes)
        if b.kernels and b.kernels.warning:
            w.append(b.kernels.warning)
        if b.onnx_cpu_fallback:
            w.append("onnxruntime's CUDA execution provider runs some nodes (int8 ones usually) on the CPU")
    ss = out.semi_structured
    if ss and ss.speedup <= 1.0:
        w.append(f"2:4 semi-structured kernels ran at {ss.speedup:.2f}x of dense ({ss.sparse_p50_ms:.1f} vs "
                 f"{ss.dense_p50_ms:.1f} ms p50): no measured gain, keep the dense weights")
    if out.recommendation and out.recommendation.batch_size is None:
        w.append(out.recommendation.reason)
    return w


def bench_models(model: str | None = None, config: str | None = None, specs: dict[str, BenchSpec] | None = None,
                 prices: dict[str, float | None] | None = None, say=lambda m: None, **options) -> dict[str, Any]:
    """`slimctl bench`: one model (or a --config architecture with random weights) measured in fresh
    processes on each device in `specs` (default: CPU); `options` are study_devices' own (sizes, dtypes,
    max_memory_mb, slo_p95_ms, repeats, inline, load_options, steps, recipe)."""
    specs = specs or {"cpu": BenchSpec()}
    return study_devices(config or model, specs, prices or {d: None for d in specs}, config_only=config is not None,
                         say=say, **options).to_json()
