"""Latency, throughput and memory of one model: a forward pass for encoders and classifiers,
prefill plus greedy decode on the KV cache for causal LMs; optionally in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DeviceError, SlimctlError, UnsupportedError
from ..formats import for_model, weight_file_bytes
from ..models import state_bytes
from ..kinds import CAUSAL_LM
from ..results.report import BenchResult, PhaseResult
from ..specs import BenchSpec
from .measure import (Latency, PeakMemory, Phase, Timer, env_threads, release_freed_memory, rss_mb, run_until,
                      torch_threads)

DEFAULTS = {CAUSAL_LM: {"batch_size": 1, "seq_len": 128}, "other": {"batch_size": 8, "seq_len": 128}}
FALLBACK_TEXT = ("Slimming a model is only worth it when the numbers say so: accuracy, latency, memory "
                 "and size, measured before and after on the same machine. ")


def settings_for(kind: str, spec: BenchSpec) -> dict[str, Any]:
    d = dict(DEFAULTS[CAUSAL_LM if kind == CAUSAL_LM else "other"])
    if spec.batch_size:
        d["batch_size"] = spec.batch_size
    if spec.seq_len:
        d["seq_len"] = spec.seq_len
    return d


def _inputs(tokenizer, batch: int, seq_len: int, max_positions: int | None, vocab: int | None = None) -> torch.Tensor:
    """Real text tokens (held-out BBC articles when installed) cut into a batch of full rows; seeded
    random ids when there is no tokenizer (a config-only model)."""
    if max_positions and seq_len > max_positions:
        raise SlimctlError(f"bench seq_len {seq_len} exceeds the model's {max_positions} positions")
    if tokenizer is None:
        return torch.randint(0, vocab or 1000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    try:
        from ..evaluate import data

        text = " ".join(e.text for e in data.bbc("eval")[:64])
    except SlimctlError:
        text = FALLBACK_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch * seq_len
    while len(ids) < need:
        ids = ids + ids
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, seq_len)


def bench_model(model, tokenizer, kind: str, spec: BenchSpec, path: str | None = None, progress=None) -> BenchResult:
    """Latency, throughput and memory of one loaded model, on `spec.threads` threads (given back afterwards)."""
    with torch_threads(spec.threads):
        return _bench_model(model, tokenizer, kind, spec, path, progress)


def _bench_model(model, tokenizer, kind: str, spec: BenchSpec, path: str | None, progress) -> BenchResult:
    s = settings_for(kind, spec)
    device = spec.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
        model.to("cuda")
    from ..quant.kernels import maybe_accelerate

    plan = maybe_accelerate(model, spec.kernels, device, kind)
    converted = None
    if spec.semi_structured:
        from ..quant.sparsity import to_semi_structured

        converted = to_semi_structured(model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    extra_decode = spec.decode_tokens if kind == CAUSAL_LM else 0
    if max_pos and s["seq_len"] + extra_decode > max_pos:
        raise SlimctlError(f"bench seq_len {s['seq_len']} + decode {extra_decode} exceeds the model's {max_pos} positions")
    ids = _inputs(tokenizer, s["batch_size"], s["seq_len"], max_pos, getattr(model.config, "vocab_size", None)).to(device)
    mask = torch.ones_like(ids)
    release_freed_memory()
    rss0 = rss_mb()
    say = progress or (lambda m: None)
    runs, notes = {}, []
    try:
        with torch.inference_mode():
            if kind == CAUSAL_LM:
                decoders, notes = _decoders(model, spec, tuple(ids.shape), device)
                for dec in decoders:
                    try:
                        runs[dec.mode] = (_bench_causal(model, ids, mask, spec, device, say, dec),
                                          getattr(dec, "compile_seconds", None))
                    except Exception as e:  # noqa: BLE001  torch.compile can fail on layers it cannot trace
                        if dec.mode == "eager" or isinstance(e, torch.cuda.OutOfMemoryError):
                            raise
                        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                        if spec.compile is True:
                            raise UnsupportedError(f"the compiled decode failed ({why}); use --compile auto or false") from None
                        notes.append(f"compile auto: decode runs eager (the compiled decode failed: {why})")
            else:
                runs["eager"] = (_bench_forward(model, ids, mask, spec, device, say), None)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(f"CUDA out of memory at batch size {s['batch_size']} x {s['seq_len']}; try a smaller --batch-size") from None
    param = next(model.parameters(), None)
    weights = state_bytes(model)
    meta = {"device": device, "threads": env_threads(), **s,
            "dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
            "rss_before_mb": round(rss0, 1), "size_mb": ((weight_file_bytes(path) if path else None) or weights) / 2**20,
            "weights_in_memory_mb": weights / 2**20}
    if converted is not None:
        meta["semi_structured_layers"] = converted
    if plan is not None:
        meta["kernels"] = plan
    meta.update(for_model(model).bench_meta(model))  # e.g. onnxruntime and its CPU fallback on a CUDA EP
    if kind == CAUSAL_LM:
        meta["decode_tokens"] = spec.decode_tokens
        meta.update(_kv_facts(model, decoders[0], tuple(ids.shape), spec))
    if notes:
        meta["notes"] = notes
    modes = {}
    for mode, (phases, compile_s) in runs.items():
        extra = {"decode_mode": mode} if kind == CAUSAL_LM else {}
        if compile_s is not None:
            extra["compile_seconds"] = round(compile_s, 2)
        modes[mode] = summarize({**meta, **extra}, phases, "request" if kind == CAUSAL_LM else "forward")
    if spec.roofline:
        from .roofline import checked_fractions

        for r in modes.values():
            r.roofline = checked_fractions(model, kind, r, device, r.dtype or "float32", spec.remeasure_peaks)
    return _with_modes(modes, spec.compile)


def summarize(meta: dict[str, Any], phases: dict[str, Phase], primary: str) -> BenchResult:
    """The bench result: run facts, the primary latency and throughput, and every phase."""
    return BenchResult.model_validate({**meta, **_from_phases(phases, primary)})


def _from_phases(phases: dict[str, Phase], primary: str) -> dict[str, Any]:
    """What a bench result derives from its phases (pool recomputes exactly these from pooled phases)."""
    pd = {k: PhaseResult.model_validate(v.to_dict()) for k, v in phases.items()}
    lat, main = pd[primary].latency_ms, pd[primary]
    out = {"latency_ms": lat.model_dump(include={"p50", "p90", "p95", "p99", "mean", "stdev", "count"}),
           "latency_of": primary,
           "throughput": {"samples_per_s": main.samples_per_s, "tokens_per_s": main.tokens_per_s},
           "peak_memory_mb": max(p.peak_memory_mb for p in phases.values()), "phases": pd}
    if "prefill" in pd:
        out["prefill_ms"] = pd["prefill"].latency_ms.model_dump(include={"p50", "p90", "p99"})
        out["decode_tokens_per_s"] = pd["decode_step"].tokens_per_s
        out["prefill_tokens_per_s"] = pd["prefill"].tokens_per_s
    return out


def pool(results: list[BenchResult]) -> BenchResult:
    """Merge repeated bench results of one model: samples pooled, each round's p50 kept."""
    first = results[0]
    if first.modes and all(r.modes for r in results):
        modes = {m: pool([r.modes[m] for r in results]) for m in first.modes}
        # every round chose compiled (compile: true, or auto that measured it faster), else the pooled figures decide
        pick = "compiled" if all(r.decode_mode == "compiled" for r in results) else choose_mode(modes, "auto")
        return _with_mode(modes, pick)
    data = {**first.to_json(), "rounds_p50_ms": [r.latency_ms.p50 for r in results]}
    if len(results) > 1:
        phases = {name: Phase.pooled(name, [r.phases[name] for r in results]) for name in first.phases}
        data.update(_from_phases(phases, first.latency_of))
        if first.decode_tokens_per_s is not None:
            data["rounds_decode_tokens_per_s"] = [r.decode_tokens_per_s for r in results]
    return BenchResult.model_validate(data)


def _bench_forward(model, ids, mask, spec: BenchSpec, device: str, say) -> dict[str, Phase]:
    b, l = ids.shape
    samples: list[float] = []

    def once():
        with Timer(device) as t:
            model(input_ids=ids, attention_mask=mask)
        samples.append(t.ms)

    say(f"bench forward {b}x{l}")
    run_until(once, spec.warmup, spec.min_iters, spec.min_seconds)
    samples_all = samples[spec.warmup:]
    with PeakMemory(device) as mem:
        model(input_ids=ids, attention_mask=mask)
    return {"forward": Phase("forward", Latency.from_values(samples_all), mem.peak_mb, b, b * l)}


def _kv_facts(model, eager, shape, spec: BenchSpec) -> dict[str, Any]:
    """The KV cache the decode used and its bytes per token: measured on the cache the last request left (a torch
    model), or from llama.cpp's layout (f16 2 bytes, q8_0 34/32, q4_0 18/32 per value) for a GGUF."""
    from ..quant.kvcache import LLAMA_CPP, bytes_per_token
    from .decode import cache_bytes

    tokens = shape[0] * (shape[1] + spec.decode_tokens)
    if getattr(model, "artifact_format", None) == "gguf":
        per = bytes_per_token(model.config, spec.kv_cache, 2, llama_cpp=True)
        return {"kv_cache": LLAMA_CPP[spec.kv_cache], "kv_bytes_per_token": round(per, 1), "kv_bytes_measured": False}
    held = cache_bytes(getattr(eager, "past", None))
    if held is None:
        return {"kv_cache": spec.kv_cache}
    return {"kv_cache": spec.kv_cache, "kv_bytes_per_token": round(held / tokens, 1), "kv_bytes_measured": True,
            "kv_cache_mb": round(held / 2**20, 2)}


def _bench_causal(model, ids, mask, spec: BenchSpec, device: str, say, decoder) -> dict[str, Phase]:
    b, l = ids.shape
    n = spec.decode_tokens
    pre, step, req = [], [], []
    peaks = {"prefill": 0.0, "decode_step": 0.0}

    def request(measure_memory: bool = False):
        with Timer(device) as total:
            with PeakMemory(device) if measure_memory else _Null() as mem:
                with Timer(device) as t:
                    nxt = decoder.prefill(ids, mask)
            if measure_memory:
                peaks["prefill"] = mem.peak_mb
            pre.append(t.ms)
            with PeakMemory(device) if measure_memory else _Null() as mem:
                for _ in range(n):
                    with Timer(device) as t:
                        nxt = decoder.step(nxt)
                    step.append(t.ms)
            if measure_memory:
                peaks["decode_step"] = mem.peak_mb
        req.append(total.ms)

    say(f"bench prefill {b}x{l} + decode {n} tokens ({decoder.mode})")
    if decoder.mode == "compiled":  # compile outside every measurement, memory included
        request()
        pre.clear(), step.clear(), req.clear()
    request(measure_memory=True)  # also the first warm-up
    warm = max(spec.warmup - 1, 0)
    run_until(request, warm, spec.min_iters, spec.min_seconds)
    drop = warm + 1
    pre, req, step = pre[drop:], req[drop:], step[drop * n:]
    return {
        "request": Phase("request", Latency.from_values(req), max(peaks.values()), b, b * n,
                         {"note": f"prefill of {l} tokens + {n} greedy decode steps; tokens_per_s counts generated tokens"}),
        "prefill": Phase("prefill", Latency.from_values(pre), peaks["prefill"], b, b * l),
        "decode_step": Phase("decode_step", Latency.from_values(step), peaks["decode_step"], b, b),
    }


def _decoders(model, spec: BenchSpec, shape, device: str) -> tuple[list, list[str]]:
    """The decode loops to measure for `spec.compile`, and notes (auto without a compiler)."""
    from .decode import CompiledDecoder, EagerDecoder, can_compile

    out, notes = [EagerDecoder(model, spec.kv_cache)], []
    if spec.compile is False:
        return out, notes
    if spec.kv_cache != "fp":
        if spec.compile is True:
            raise UnsupportedError(f"kv_cache {spec.kv_cache} runs on the eager decode only (the compiled decode uses a "
                                   "static fp cache); use --compile false or auto")
        return out, [f"compile auto: decode runs eager (kv_cache {spec.kv_cache} has no compiled path)"]
    ok, why = can_compile(device)
    if not ok and spec.compile == "auto":
        return out, [f"compile auto: decode runs eager ({why})"]
    if not ok:
        raise UnsupportedError(f"bench.compile is true but {why}")
    try:
        out.append(CompiledDecoder(model, shape[0], shape[1] + spec.decode_tokens, device))
    except UnsupportedError as e:
        if spec.compile is True:
            raise
        notes.append(f"compile auto: decode runs eager ({e})")
    return out, notes


def choose_mode(modes: dict[str, BenchResult], setting) -> str:
    """compile true: the compiled path; auto: whichever has the lower p50 request latency."""
    if "compiled" not in modes:
        return "eager"
    if setting is True:
        return "compiled"
    return min(modes, key=lambda k: modes[k].latency_ms.p50)


def _with_modes(modes: dict[str, BenchResult], setting) -> BenchResult:
    """The chosen mode's result at the top, every mode's full result under "modes"."""
    if len(modes) == 1:
        return modes["eager"]
    return _with_mode(modes, choose_mode(modes, setting))


def _with_mode(modes: dict[str, BenchResult], pick: str) -> BenchResult:
    return BenchResult.model_validate({**modes[pick].to_json(), "decode_mode": pick, "modes": modes})


class _Null:
    peak_mb = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_isolated(folder: str, spec: BenchSpec, timeout: float | None = None, load_options: dict | None = None,
                   dtype: str | None = None, config_only: bool = False, max_memory_mb: float | None = None,
                   steps: list[dict[str, Any]] | None = None) -> BenchResult:
    """Run bench_model on the model in `folder` in a fresh Python process, so that memory
    high-water marks, allocator caches and thread pools of one measurement cannot leak into another.
    `steps` (recipe steps as dicts) are applied in that process first: a slimmed variant."""
    with tempfile.TemporaryDirectory(prefix="slimctl-bench-") as tmp:
        out = Path(tmp) / "result.json"
        opts = {**(load_options or {}), "dtype": dtype, "config_only": config_only, "max_memory_mb": max_memory_mb,
                "steps": steps}
        cmd = [sys.executable, "-m", "slimctl.bench.worker", folder, spec.model_dump_json(), str(out), json.dumps(opts)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.exists():
            res = json.loads(out.read_text())
            if "error" in res:
                err = SlimctlError(res["error"])
                err.exit_code = res.get("exit_code", 3)
                raise err
            return BenchResult.model_validate(res)
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"bench worker exited with {proc.returncode}: {tail[0]}")


def alternate(first: Callable[[int], BenchResult], second: Callable[[int], BenchResult], repeats: int, say=lambda m: None,
              names: tuple[str, str] = ("baseline", "slimmed artifact")) -> tuple[list[BenchResult], list[BenchResult]]:
    """`repeats` rounds of `first` then `second` (each call gets the round's index): the two sides of a
    comparison alternate, so slow drifts of the machine hit both alike. Used by `run` and `bench --recipe`."""
    a, b = [], []
    for i in range(repeats):
        say(f"benchmarking {names[0]}, round {i + 1}/{repeats} (fresh process)")
        a.append(first(i))
        say(f"benchmarking {names[1]}, round {i + 1}/{repeats} (fresh process)")
        b.append(second(i))
    return a, b


def pair_isolated(base_folder: str, slim_folder: str, spec: BenchSpec, repeats: int, say=lambda m: None,
                  load_options: dict | None = None, base_spec: BenchSpec | None = None) -> tuple[BenchResult, BenchResult]:
    """Baseline and slimmed artifact in alternating fresh-process rounds; each side's rounds pooled
    (every round's p50 kept for the noise-aware gates). `base_spec`: the baseline's, when it differs."""
    rb, rs = alternate(lambda i: bench_isolated(base_folder, base_spec or spec, load_options=load_options),
                       lambda i: bench_isolated(slim_folder, spec, load_options=load_options), repeats, say)
    return pool(rb), pool(rs)
