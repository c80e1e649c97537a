"""The typed settings every layer shares: what eval measures (EvalSpec), how bench measures (BenchSpec)
and the gates (Gates). Recipes hold them; evaluate and bench read them. Imports nothing of slimctl's."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# the KV cache a causal LM decodes with: fp (the model's dtype), int8 / int4 in blocks of 32 with an fp16 scale
# (slimctl.kvcache; llama.cpp's q8_0 / q4_0 for a GGUF, whose names are accepted too)
KV_NAMES = {"fp": "fp", "f16": "fp", "int8": "int8", "q8_0": "int8", "int4": "int4", "q4_0": "int4"}


def _kv(v: str) -> str:
    if v not in KV_NAMES:
        raise ValueError(f"kv_cache must be fp, int8 or int4 (llama.cpp names f16, q8_0, q4_0), not {v!r}")
    return KV_NAMES[v]


class EvalSpec(Strict):
    """What `eval` measures; None means the task kind's default (see evaluate.defaults)."""

    data: str | None = None  # .txt or .jsonl (field "text", plus "label" for classifiers)
    max_samples: int | None = Field(default=None, gt=0, le=100_000)
    seq_len: int | None = Field(default=None, ge=8, le=32_768)  # context length for perplexity / truncation
    stride: int | None = Field(default=None, ge=1, le=32_768)  # perplexity window stride (default = seq_len)
    max_tokens: int | None = Field(default=None, ge=16, le=10_000_000)  # causal LM: tokens scored at most
    tasks: list[str] | None = None  # lm-evaluation-harness tasks: names, task YAML paths, or bbc-topic (built in)
    task_limit: int | None = Field(default=None, gt=0)  # documents per task at most (default: all)
    task_batch_size: int = Field(default=8, ge=1, le=1024)
    kv_cache: str = "fp"  # causal LM: perplexity with the KV cache quantized (each window's keys/values)
    skip: bool = False

    @field_validator("kv_cache")
    @classmethod
    def _kv_name(cls, v: str) -> str:
        return _kv(v)


class BenchSpec(Strict):
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    seq_len: int | None = Field(default=None, ge=1, le=32_768)
    decode_tokens: int = Field(default=32, ge=1, le=4096)  # causal LM: tokens generated per request
    warmup: int = Field(default=2, ge=0, le=1000)
    min_iters: int = Field(default=5, ge=1, le=100_000)
    min_seconds: float = Field(default=2.0, ge=0.0, le=3600.0)
    threads: int | None = Field(default=None, ge=1, le=1024)
    repeats: int = Field(default=3, ge=1, le=100)  # `run`: baseline and slimmed alternate, each in a fresh process
    roofline: bool = False  # also measure the device's bandwidth/GEMM peaks and report % of the roofline floors
    remeasure_peaks: bool = False  # measure the peaks again instead of reading them from the cache
    semi_structured: bool = False  # CUDA: run 2:4-sparse Linear layers on sparse tensor cores
    # weight-only int4/int8 layers on fused kernels with bf16 activations where the device has them
    # (slimctl.kernels); "off" keeps the dequantize path. Eval in `run` uses the same setting.
    kernels: Literal["auto", "off"] = "auto"
    # causal LMs: also measure decode on a static KV cache with the step under torch.compile (CUDA graphs
    # on GPU). true: report the compiled path; auto: the faster of eager and compiled; both are kept.
    # Off by default: compiling costs about a minute per fresh process on a 2-core CPU.
    compile: bool | Literal["auto"] = False
    kv_cache: str = "fp"  # causal LM: decode with an int8 / int4 KV cache (eager decode only)
    skip: bool = False

    @field_validator("kv_cache")
    @classmethod
    def _kv_name(cls, v: str) -> str:
        return _kv(v)

    @model_validator(mode="after")
    def _kv_eager(self):
        if self.kv_cache != "fp" and self.compile is True:
            raise ValueError(f"kv_cache {self.kv_cache} runs on the eager decode only (the compiled decode uses a static "
                             "fp cache); use compile false or auto")
        return self


class Gates(Strict):
    max_ppl_increase_pct: float | None = Field(default=None, ge=0)
    min_fidelity: float | None = Field(default=None, ge=-1, le=1)
    min_speedup: float | None = Field(default=None, gt=0)
    max_size_ratio: float | None = Field(default=None, gt=0)
    max_task_drop_pct: float | None = Field(default=None, ge=0)  # lm-eval tasks: largest accuracy drop, %
    min_eval_tokens: int = Field(default=1024, ge=0)  # a perplexity gate on fewer scored tokens fails


class ExportSpec(Strict):
    """An extra artifact a run writes beside model/: a GGUF file for llama.cpp. `format` names an exporter
    (formats/exporters.py; the recipe checks it); the other options are GGUF's, the one exporter today."""

    format: str = "gguf"
    embeddings: Literal["q8_0", "f16", "f32"] = "q8_0"  # token embedding (and an untied float LM head)
    float_type: Literal["f16", "f32", "bf16"] = "f16"  # float Linear layers
    requantize: bool = False  # quantize again what cannot be packed exactly (with a warning) instead of refusing
