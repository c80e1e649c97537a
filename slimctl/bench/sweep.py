"""Bench sweeps across batch sizes (or `auto`: grow until memory runs out or throughput stops
improving, then bisect) and dtypes, each point in a fresh process; the recommendation; the cost per
million tokens or samples at a stated hourly price; CPU-vs-GPU placement; config-only architectures
and their data-free slimmed variants."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from ..errors import SlimctlError, UsageError
from ..kinds import CAUSAL_LM
from ..specs import BenchSpec

# Examples only, printed as such: the user's own price belongs in --hourly-cost.
EXAMPLE_HOURLY_USD = {"cpu": 0.10, "cuda": 2.50}
AUTO_MAX_BATCH = 256  # auto never goes past this; ask for larger sizes explicitly
GAIN = 1.10  # auto: a doubling that adds less than 10 % throughput does not pay


def parse_sizes(text: str) -> list[int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--batch-sizes takes a comma list of integers or 'auto', not {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 4096:
        raise UsageError("--batch-sizes must lie in 1..4096")
    return sizes


def _row(batch: int, cast: str | None, res: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    if res is None:
        return {"batch_size": batch, "dtype": cast or "as saved", "cast": cast,
                "status": "out of memory" if error and "memory" in error else "error", "error": error}
    lat = res["latency_ms"]
    return {"batch_size": batch, "dtype": res.get("dtype") or cast, "cast": cast, "status": "ok", "p50_ms": lat["p50"], "p95_ms": res["phases"][res["latency_of"]]["latency_ms"]["p95"],
            "samples_per_s": res["throughput"]["samples_per_s"], "tokens_per_s": res["throughput"]["tokens_per_s"],
            "decode_tokens_per_s": res.get("decode_tokens_per_s"), "peak_memory_mb": res["peak_memory_mb"], "result": res}


def sweep(measure: Callable[[BenchSpec], dict[str, Any]], spec: BenchSpec, sizes: list[int] | str, dtype: str | None,
          max_memory_mb: float | None, say=lambda m: None) -> list[dict[str, Any]]:
    """Measure each batch size; `auto` doubles from 1 and, on running out of memory, bisects between
    the last size that fit and the first that did not."""

    def point(b: int) -> dict[str, Any]:
        say(f"batch {b}" + (f" ({dtype})" if dtype else ""))
        try:
            row = _row(b, dtype, measure(spec.model_copy(update={"batch_size": b})))
        except SlimctlError as e:
            return _row(b, dtype, None, str(e))
        if max_memory_mb is not None and row["peak_memory_mb"] > max_memory_mb:
            row.update(status="out of memory", error=f"peak {row['peak_memory_mb']:.0f} MB exceeds --max-memory {max_memory_mb:g} MB")
        return row

    if sizes != "auto":
        rows = []
        for b in sizes:
            rows.append(point(b))
            if rows[-1]["status"] == "out of memory":
                break  # larger batches need more memory still
        return rows
    rows, b, best, flat = [], 1, 0.0, 0
    while b <= AUTO_MAX_BATCH:
        r = point(b)
        rows.append(r)
        if r["status"] != "ok":
            lo = b // 2
            hi = b
            while hi - lo > max(1, lo // 4) and lo >= 1:  # bisect down to a quarter of the last good size
                mid = (lo + hi) // 2
                m = point(mid)
                rows.append(m)
                lo, hi = (mid, hi) if m["status"] == "ok" else (lo, mid)
            break
        tput = r["samples_per_s"]
        flat = flat + 1 if best and tput < best * GAIN else 0
        if flat == 2:
            break  # the knee: two doublings in a row no longer paid
        best = max(best, tput)
        b *= 2
    return sorted(rows, key=lambda r: r["batch_size"])


def recommend(rows: list[dict[str, Any]], slo_p95_ms: float | None) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    if slo_p95_ms is not None:
        meet = [r for r in ok if r["p95_ms"] <= slo_p95_ms]
        if not meet:
            fastest = min(ok, key=lambda r: r["p95_ms"])
            return {"batch_size": None, "dtype": None, "reason": f"no batch size meets p95 <= {slo_p95_ms:g} ms; the lowest p95 is "
                    f"{fastest['p95_ms']:.1f} ms at batch {fastest['batch_size']} ({fastest['dtype']})"}
        r = max(meet, key=lambda r: r["samples_per_s"])
        return {"batch_size": r["batch_size"], "dtype": r["dtype"],
                "reason": f"highest throughput ({r['samples_per_s']:.1f} samples/s) whose p95 {r['p95_ms']:.1f} ms meets the {slo_p95_ms:g} ms SLO"}
    top = max(r["samples_per_s"] for r in ok)
    knee = min((r for r in ok if r["samples_per_s"] >= 0.9 * top), key=lambda r: (r["batch_size"], r["p95_ms"]))
    return {"batch_size": knee["batch_size"], "dtype": knee["dtype"],
            "reason": f"the throughput knee: smallest batch within 10 % of the best throughput ({knee['samples_per_s']:.1f} of "
                      f"{top:.1f} samples/s), so latency stays as low as that throughput allows (no --slo-p95-ms given)"}


def cost(result: dict[str, Any], kind_is_lm: bool, device: str, hourly_usd: float | None) -> dict[str, Any]:
    """USD per 1M generated tokens (causal LM, decode throughput) or per 1M samples."""
    example = hourly_usd is None
    price = EXAMPLE_HOURLY_USD[device] if example else hourly_usd
    per_s = price / 3600
    out: dict[str, Any] = {"hourly_usd": price, "assumption": (f"EXAMPLE price {price:g} USD/h for {device}: set --hourly-cost"
                                                               if example else f"{price:g} USD/h (--hourly-cost)")}
    if kind_is_lm and result.get("decode_tokens_per_s"):
        tps = result["throughput"]["tokens_per_s"]  # generated tokens per second of whole requests
        out["usd_per_1m_tokens"] = per_s / tps * 1e6
        out["basis"] = f"{tps:.1f} generated tokens/s over whole requests (prefill + decode) at batch {result['batch_size']}"
    else:
        sps = result["throughput"]["samples_per_s"]
        out["usd_per_1m_samples"] = per_s / sps * 1e6
        out["basis"] = f"{sps:.1f} samples/s at batch {result['batch_size']}"
    return out


# Architectures for `bench --config NAME`: shapes of public models, weights random (speed and memory only).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                 "rms_norm_eps": 1e-5},
    "llama-8b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
                 "rms_norm_eps": 1e-5},
    "smollm2-1.7b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "max_position_embeddings": 8192, "rope_theta": 130000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
}


def config_folder(spec: str, into) -> "Path":
    """A folder holding only config.json, from a built-in architecture name or a config.json path."""
    import json
    from pathlib import Path

    from ..errors import ModelLoadError

    if spec in ARCHITECTURES:
        cfg = ARCHITECTURES[spec]
    else:
        p = Path(spec)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ModelLoadError(f"--config {spec} is neither a config.json nor a built-in architecture "
                                 f"({', '.join(ARCHITECTURES)})")
        try:
            cfg = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"--config {p} is not valid JSON") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ModelLoadError(f"--config {p} has no model_type; it is not a transformers config")
    folder = Path(into) / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def params_from_config(folder) -> int | None:
    """Parameter count of a config-only model, without building it (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001  only informative
        return None


def study(target: str, spec: BenchSpec, *, config_only: bool = False, sizes: list[int] | str | None = None,
          dtypes: list[str] | None = None, max_memory_mb: float | None = None, slo_p95_ms: float | None = None,
          hourly_usd: float | None = None, repeats: int = 3, inline: bool = False, load_options: dict | None = None,
          steps: list[dict[str, Any]] | None = None, variant: list[dict[str, Any]] | None = None,
          say=lambda m: None) -> dict[str, Any]:
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

        def measure(s: BenchSpec, dtype: str | None, roofline: bool = False, with_steps=steps) -> dict[str, Any]:
            from . import bench_isolated

            if inline:
                return _inline(str(folder), s, load_options or {}, roofline)
            return bench_isolated(str(folder), s.model_copy(update={"roofline": roofline}), load_options=load_options,
                                  dtype=dtype, config_only=config_only, max_memory_mb=max_memory_mb, steps=with_steps)

        out = _header(target, kind, spec, inline, steps, config_only, folder)
        best = None
        if sizes is not None:
            best = _sweep_point(out, measure, spec, sizes, dtypes, kind, max_memory_mb, slo_p95_ms, hourly_usd, say)
        else:
            rounds = _rounds(measure, spec, dtypes[0], 1 if inline else repeats, variant, say)
            out["bench"] = _headline(rounds["baseline"])
            if variant:
                slim = {**_header(target, kind, spec, inline, variant, config_only, folder), "bench": _headline(rounds["slimmed"])}
                out["slimmed"] = _finish(slim, functools.partial(measure, with_steps=variant), spec, dtypes, kind,
                                         hourly_usd, sizes, None, say)
        _finish(out, measure, spec, dtypes, kind, hourly_usd, sizes, best, say)
    return out


def _header(target: str, kind: str, spec: BenchSpec, inline: bool, steps, config_only: bool, folder) -> dict[str, Any]:
    out: dict[str, Any] = {"model": target, "kind": kind, "device": spec.device, "isolated": not inline}
    if steps:
        out["steps"] = steps
    if config_only:
        out["config_only"] = {"architecture": target, "parameters": params_from_config(folder),
                              "note": "random-initialised weights: speed and memory only, no accuracy"}
    return out


def _rounds(measure, spec: BenchSpec, dtype: str | None, repeats: int, variant, say) -> dict[str, list[dict[str, Any]]]:
    """`repeats` rounds of the model, alternating with rounds of its variant when there is one; the
    first round of each side also measures the roofline."""
    from . import alternate

    if variant:
        base, slim = alternate(lambda i: measure(spec, dtype, roofline=(i == 0)),
                               lambda i: measure(spec, dtype, roofline=(i == 0), with_steps=variant), repeats, say,
                               ("the model", "its slimmed variant"))
        return {"baseline": base, "slimmed": slim}
    rounds = []
    for i in range(repeats):
        say(f"round {i + 1}/{repeats}" + (" (fresh process)" if repeats > 1 else ""))
        rounds.append(measure(spec, dtype, roofline=(i == 0)))
    return {"baseline": rounds, "slimmed": []}


def _headline(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    from . import pool

    head = pool(rounds)
    head["roofline"] = rounds[0].get("roofline")
    p50s = head["rounds_p50_ms"]
    head["spread_p50_ms"] = [min(p50s), max(p50s)]
    return head


def _sweep_point(out: dict[str, Any], measure, spec: BenchSpec, sizes, dtypes: list, kind: str, max_memory_mb,
                 slo_p95_ms, hourly_usd, say) -> dict[str, Any] | None:
    """The batch-size (and dtype) sweep, its recommendation, and the roofline at the recommended point;
    returns the recommended row (None when no point ran)."""
    rows = []
    for dt in dtypes:
        rows += sweep(lambda s, dt=dt: measure(s, dt), spec, sizes, dt, max_memory_mb, say)
    rec = recommend(rows, slo_p95_ms)
    for r in rows:
        if r["status"] == "ok":
            r["cost"] = cost(r["result"], kind == CAUSAL_LM, spec.device, hourly_usd)
    best = next((r for r in rows if rec and r["batch_size"] == rec["batch_size"] and r["dtype"] == rec["dtype"]), None)
    out.update(sweep=[{k: v for k, v in r.items() if k != "result"} for r in rows], recommendation=rec)
    if best is not None:
        say(f"roofline at batch {best['batch_size']}")
        out["bench"] = measure(spec.model_copy(update={"batch_size": best["batch_size"]}), best["cast"], roofline=True)
    return best


def _finish(out: dict[str, Any], measure, spec: BenchSpec, dtypes: list, kind: str, hourly_usd, sizes, best,
            say) -> dict[str, Any]:
    """The dense reference of a 2:4 point, the cost of the headline result, and the warnings."""
    if out.get("bench") and spec.semi_structured:  # the same point dense, so the 2:4 gain is measured, not assumed
        say("dense reference for 2:4")
        cast = dtypes[0] if sizes is None else best["cast"]
        dense = measure(spec.model_copy(update={"semi_structured": False, "batch_size": out["bench"]["batch_size"]}), cast)
        sp, dn = out["bench"]["latency_ms"]["p50"], dense["latency_ms"]["p50"]
        out["semi_structured"] = {"layers": out["bench"].get("semi_structured_layers"), "sparse_p50_ms": sp,
                                  "dense_p50_ms": dn, "speedup": dn / sp}
    if out.get("bench"):
        out["cost"] = cost(out["bench"], kind == CAUSAL_LM, spec.device, hourly_usd)
    out["warnings"] = _warnings(out, dtypes)
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


def variant_ratios(base: dict[str, Any], slim: dict[str, Any]) -> dict[str, Any]:
    """Slimmed vs baseline of the same architecture: >1 speedups are faster, <1 memory ratios smaller."""
    b, s = base.get("bench") or {}, slim.get("bench") or {}
    if not b or not s:
        return {}
    out = {"speedup": b["latency_ms"]["p50"] / s["latency_ms"]["p50"],
           "weights_ratio": s["weights_in_memory_mb"] / b["weights_in_memory_mb"],
           "peak_memory_ratio": s["peak_memory_mb"] / b["peak_memory_mb"]}
    if b.get("decode_tokens_per_s") and s.get("decode_tokens_per_s"):
        out["decode_speedup"] = s["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        out["prefill_speedup"] = b["prefill_ms"]["p50"] / s["prefill_ms"]["p50"]
    lo, hi = b.get("spread_p50_ms") or [None, None]
    if lo is not None and (s.get("spread_p50_ms") or [None])[0] is not None:
        out["within_noise"] = s["spread_p50_ms"][0] <= hi and lo <= s["spread_p50_ms"][1]
    return out


def parse_hourly(text: str | None, devices: list[str]) -> dict[str, float | None]:
    """`--hourly-cost`: one price for every device ("0.10") or one per device ("cpu=0.68,cuda=3.50")."""
    if text is None:
        return {d: None for d in devices}
    try:
        if "=" not in text:
            return {d: float(text) for d in devices}
        prices = {k.strip(): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise UsageError(f"--hourly-cost takes USD per hour: 0.10 or cpu=0.68,cuda=3.50; got {text!r}") from None
    if any(v < 0 for v in prices.values()) or set(prices) - set(devices):
        raise UsageError(f"--hourly-cost names {', '.join(sorted(prices))}; the devices measured are {', '.join(devices)}")
    return {d: prices.get(d) for d in devices}


def placement(by_device: dict[str, dict[str, Any]], slo_p95_ms: float | None) -> dict[str, Any]:
    """Where to run this model: per device its headline p95 (whole request), whether that meets the
    SLO, and its cost; the choice is the cheapest device that meets the SLO (the cheapest when no
    SLO is given). Costs compare only when each was measured on its own device's throughput."""
    rows = {}
    for dev, r in by_device.items():
        b, c = r.get("bench") or {}, r.get("cost") or {}
        usd = c.get("usd_per_1m_tokens", c.get("usd_per_1m_samples"))
        if not b or usd is None:
            continue
        p95 = b["latency_ms"]["p95"]
        rows[dev] = {"p95_ms": p95, "meets_slo": None if slo_p95_ms is None else p95 <= slo_p95_ms, "usd_per_1m": usd,
                     "unit": "tokens" if "usd_per_1m_tokens" in c else "samples", "hourly_usd": c["hourly_usd"],
                     "example_price": "EXAMPLE" in c["assumption"], "batch_size": b["batch_size"]}
    if not rows:
        return {"devices": rows, "choice": None, "line": "no device gave a result to compare"}
    fits = [d for d, r in rows.items() if r["meets_slo"] is not False]
    parts = "; ".join(f"{d}: p95 {r['p95_ms']:.1f} ms" + ("" if r["meets_slo"] is None else " (meets the SLO)" if r["meets_slo"]
                      else " (misses the SLO)") + f", {r['usd_per_1m']:.4g} USD per 1M {r['unit']} at {r['hourly_usd']:g} USD/h"
                      + (" (EXAMPLE price)" if r["example_price"] else "") for d, r in rows.items())
    if not fits:
        return {"devices": rows, "choice": None, "line": f"no device meets p95 <= {slo_p95_ms:g} ms. {parts}"}
    choice = min(fits, key=lambda d: rows[d]["usd_per_1m"])
    why = (f"the cheapest that meets p95 <= {slo_p95_ms:g} ms" if slo_p95_ms is not None else "the cheapest per "
           f"{rows[choice]['unit'][:-1]} (no --slo-p95-ms given)")
    return {"devices": rows, "choice": choice, "line": f"place it on {choice}: {why}. {parts}"}


def study_devices(target: str, specs: dict[str, BenchSpec], prices: dict[str, float | None], *,
                  steps: list[dict[str, Any]] | None = None, recipe: str | None = None, slo_p95_ms: float | None = None,
                  say=lambda m: None, **kw) -> dict[str, Any]:
    """`study` on each device (one: its result; several: all of them plus a placement line), and with
    `steps` the slimmed variant of a config-only model next to its baseline on each device."""
    from ..report import environment

    by_device = {}
    for dev, spec in specs.items():
        if len(specs) > 1:
            say(f"measuring on {dev}")
        if steps:
            say(f"slimmed variant: {recipe} (alternating rounds with the model)")
        r = by_device[dev] = study(target, spec, slo_p95_ms=slo_p95_ms, hourly_usd=prices[dev], variant=steps, say=say, **kw)
        if steps:
            r["slimmed"] = {**r["slimmed"], "recipe": recipe, "vs_baseline": variant_ratios(r, r["slimmed"])}
        r["environment"] = environment(0, dev)
    if len(specs) == 1:
        return by_device[next(iter(specs))]
    return {"model": target, "by_device": by_device, "placement": placement(by_device, slo_p95_ms)}


def _inline(folder: str, spec: BenchSpec, load_options: dict, roofline: bool) -> dict[str, Any]:
    from ..models import load
    from . import bench_model

    loaded = load(folder, **load_options)
    return bench_model(loaded.model, loaded.tokenizer, loaded.kind, spec.model_copy(update={"roofline": roofline}), loaded.path)


def _warnings(out: dict[str, Any], dtypes: list) -> list[str]:
    from .measure import cpu_flags

    w = []
    if out["device"] == "cpu" and any(d == "bf16" for d in dtypes):
        flags = cpu_flags()
        if not ({"amx_bf16", "avx512_bf16"} & flags):
            w.append("bf16 on a CPU without AMX or AVX512-BF16 runs through slow conversions; expect it slower than fp32")
    if out["device"] == "cpu" and any(d == "fp16" for d in dtypes):
        w.append("fp16 on CPU is emulated by most kernels; bf16 is the CPU's half precision")
    b = out.get("bench") or {}
    w.extend(b.get("notes") or [])
    if (b.get("kernels") or {}).get("warning"):
        w.append(b["kernels"]["warning"])
    if b.get("onnx_cpu_fallback"):
        w.append("onnxruntime's CUDA execution provider runs some nodes (int8 ones usually) on the CPU")
    ss = out.get("semi_structured")
    if ss and ss["speedup"] <= 1.0:
        w.append(f"2:4 semi-structured kernels ran at {ss['speedup']:.2f}x of dense ({ss['sparse_p50_ms']:.1f} vs "
                 f"{ss['dense_p50_ms']:.1f} ms p50): no measured gain, keep the dense weights")
    rec = out.get("recommendation")
    if rec and rec.get("batch_size") is None:
        w.append(rec["reason"])
    return w
