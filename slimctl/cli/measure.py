"""`slimctl eval` and `slimctl bench`: measure one model's accuracy, or its speed and memory."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import _common as C


def eval_cmd(
    model: str = typer.Argument(..., help="Built-in name, local HF folder (an artifact too), or hub id."),
    data: Optional[Path] = typer.Option(None, "--data", help=".txt or .jsonl ('text', and 'label' for classifiers). A causal LM "
                                        "reads a .txt as one token stream; encoders read its paragraphs. Default: held-out BBC News."),
    against: Optional[str] = typer.Option(None, "--against", help="Baseline model: adds top-1 agreement, KL, cosine."),
    max_samples: Optional[int] = C.MAX_SAMPLES_OPT,
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length (perplexity) or truncation length."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Causal LM: score at most N tokens (default 16384)."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="lm-evaluation-harness task: a name, a task YAML over local "
                                             "files, or bbc-topic (built in, offline). Repeat for several."),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", help="At most N documents per task."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: weight-only int4/int8 layers on fused kernels with bf16 "
                                "activations where the CPU has them (as `bench` runs them); off: the dequantize path."),
    kv_cache: str = C.KV_OPT,
    runtime: str = C.RUNTIME_OPT,
    seed: int = C.SEED_OPT, as_json: bool = C.JSON_OPT, allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Measure accuracy: perplexity (causal LM), embedding fidelity and topic accuracy (encoder), accuracy (classifier),
    and lm-eval task accuracy with --task.

    Example: [bold]slimctl eval runs/smol-bf16/model --against smollm2-135m --max-samples 8[/bold]

    Example: [bold]slimctl eval smollm2-135m --data book.txt[/bold]   (one token stream, up to 16,384 tokens)

    Example: [bold]slimctl eval runs/smol-int4/model --against smollm2-135m --task bbc-topic --task my-task.yaml[/bold]

    Example: [bold]slimctl eval runs/g32/model.gguf --against smollm2-135m[/bold]   (llama.cpp, the same windows)

    Example: [bold]slimctl eval smollm2-135m --kv-cache int8 --seq-len 2048[/bold]   (vs the same model's fp KV cache)
    """
    from .. import api
    from ..errors import UsageError
    from ..render import text

    C.check_runtime(runtime, model)
    spec = C.spec("EvalSpec", data=str(data) if data else None, max_samples=max_samples, seq_len=seq_len,
                  max_tokens=max_tokens, tasks=task or None, task_limit=task_limit, kv_cache=kv_cache)
    if kernels not in ("auto", "off"):
        raise UsageError(f"--kernels takes auto or off, not {kernels!r}")
    ui = C.UI()
    result = api.evaluate(model, against, spec, kernels, seed, C.load_opts(allow_pickle, trust_remote_code, allow_non_finite), ui.say, ui.track)
    for w in result["warnings"]:
        C.warn(w)
    C.emit(result, as_json, text.eval_result)


def bench(
    model: Optional[str] = typer.Argument(None, help="Built-in name, local HF folder (an artifact too), or hub id."),
    config: Optional[str] = typer.Option(None, "--config", help="Instead of a model: a config.json or llama-1b / llama-8b / smollm2-1.7b, random weights."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, or cpu,cuda: measure on both and say where it is cheaper (placement)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: 1 for causal LMs, 8 otherwise."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Sweep: 1,4,16 or auto (double until memory or throughput runs out)."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Sweep dtypes too: fp32,bf16,fp16 (cast before measuring)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Prompt / input length in tokens (default 128)."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Causal LM: greedy tokens generated per request."),
    min_iters: int = typer.Option(10, "--min-iters", help="Measure at least this many iterations…"),
    min_seconds: float = typer.Option(3.0, "--min-seconds", help="…and for at least this long."),
    repeats: int = typer.Option(3, "--repeats", help="Fresh-process rounds of a single-point bench; the p50 spread is reported."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="MB a point may use (CPU: plays device memory; over it = out of memory)."),
    slo_p95_ms: Optional[float] = typer.Option(None, "--slo-p95-ms", help="Recommend the highest throughput whose p95 latency meets this."),
    hourly_cost: Optional[str] = typer.Option(None, "--hourly-cost", help="USD per hour for cost per 1M tokens: 0.10, or cpu=0.68,cuda=3.50 (default: marked examples)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    semi_structured: bool = typer.Option(False, "--semi-structured", help="CUDA, fp16/bf16: run 2:4-pruned Linear layers on sparse tensor cores."),
    kernels: str = typer.Option("auto", "--kernels", help="auto: weight-only int4/int8 layers on fused kernels (bf16 activations) "
                                "where the device has them; off: the dequantize path."),
    compile_: Optional[str] = C.COMPILE_OPT,
    kv_cache: str = C.KV_OPT,
    runtime: str = C.RUNTIME_OPT,
    remeasure_peaks: bool = typer.Option(False, "--remeasure-peaks", help="Measure the machine's bandwidth and GEMM peaks "
                                         "again (run alone on the machine) instead of the cached ones."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="With --config: also measure this data-free recipe's slimmed variant (int4-rtn, int8-dynamic, nf4…)."),
    inline: bool = C.INLINE_OPT, as_json: bool = C.JSON_OPT, allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Measure latency percentiles, throughput, peak memory, % of roofline and cost (prefill and decode for causal LMs).

    Each measurement runs in a fresh process. Examples:
    [bold]slimctl bench smollm2-135m --hourly-cost 0.10[/bold]
    [bold]slimctl bench minilm-l6 --batch-sizes auto --json[/bold]
    [bold]slimctl bench --config llama-1b --dtypes fp32,bf16 --batch-sizes 1,4 --seq-len 64 --decode-tokens 8[/bold]
    [bold]slimctl bench --config llama-1b --device cpu,cuda --slo-p95-ms 2000 --hourly-cost cpu=0.68,cuda=3.50[/bold]
    [bold]slimctl bench --config llama-8b --recipe recipes/int4-rtn-g128.yaml --seq-len 32 --decode-tokens 8 --repeats 1[/bold]
    [bold]slimctl bench runs/g32/model.gguf[/bold]   (llama.cpp: prefill and decode, batch 1)
    [bold]slimctl bench smollm2-135m --kv-cache int8 --seq-len 8192 --decode-tokens 16[/bold]   (KV bytes per token, peak memory)
    """
    from .. import api
    from ..render import text

    C.check_runtime(runtime, model)
    devices, study = _bench_study(model, config, device, batch_sizes, dtypes, repeats, recipe, max_memory, slo_p95_ms, inline)
    specs = {dev: C.spec("BenchSpec", device=dev, batch_size=batch_size, seq_len=seq_len, decode_tokens=decode_tokens,
                         min_iters=min_iters, min_seconds=min_seconds, threads=threads, semi_structured=semi_structured,
                         kernels=kernels, compile=C.compile_flag(compile_) or False, kv_cache=kv_cache,
                         remeasure_peaks=remeasure_peaks, repeats=repeats) for dev in devices}  # checks --repeats too
    from ..bench.cost import parse_hourly

    result = api.bench(model, config, specs, parse_hourly(hourly_cost, devices), C.UI().say,
                       load_options=C.load_opts(allow_pickle, trust_remote_code, allow_non_finite), **study)
    C.emit(result, as_json, text.bench)


def _bench_study(model, config, device: str, batch_sizes, dtypes, repeats: int, recipe, max_memory, slo_p95_ms,
                 inline: bool) -> tuple[list[str], dict]:
    """bench's options checked together: the devices to measure on, and the study's keyword options."""
    from ..bench.study import data_free_steps
    from ..bench.sweep import parse_sizes
    from ..errors import DeviceError, UsageError

    if (model is None) == (config is None):
        raise UsageError("give a MODEL or --config, not both or neither")
    dts = [d.strip() for d in dtypes.split(",")] if dtypes else None
    if dts and any(d not in ("fp32", "bf16", "fp16") for d in dts):
        raise UsageError(f"--dtypes takes fp32, bf16, fp16; got {dtypes}")
    devices = [d.strip() for d in device.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices) or any(d not in ("cpu", "cuda") for d in devices):
        raise UsageError(f"--device takes cpu, cuda or cpu,cuda; got {device!r}")
    if recipe is not None and config is None:
        raise UsageError("--recipe measures a slimmed variant of a --config architecture; for a real model use slimctl run")
    study = {"sizes": parse_sizes(batch_sizes) if batch_sizes else None, "dtypes": dts, "max_memory_mb": max_memory,
             "slo_p95_ms": slo_p95_ms, "repeats": repeats, "inline": inline,
             "steps": data_free_steps(str(recipe)) if recipe is not None else None, "recipe": str(recipe) if recipe else None}
    if "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    return devices, study
