"""The typed recipe (version 1): steps, eval and bench settings, gates; unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSpec(_Strict):
    """What `eval` measures; None means the task kind's default (see evaluate.defaults)."""

    data: str | None = None  # .txt or .jsonl (field "text", plus "label" for classifiers)
    max_samples: int | None = Field(default=None, gt=0, le=100_000)
    seq_len: int | None = Field(default=None, ge=8, le=32_768)  # context length for perplexity / truncation
    stride: int | None = Field(default=None, ge=1, le=32_768)  # perplexity window stride (default = seq_len)
    max_tokens: int | None = Field(default=None, ge=16, le=10_000_000)  # causal LM: tokens scored at most
    tasks: list[str] | None = None  # lm-evaluation-harness tasks: names, task YAML paths, or bbc-topic (built in)
    task_limit: int | None = Field(default=None, gt=0)  # documents per task at most (default: all)
    task_batch_size: int = Field(default=8, ge=1, le=1024)
    skip: bool = False


class BenchSpec(_Strict):
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
    semi_structured: bool = False  # CUDA: run 2:4-sparse Linear layers on sparse tensor cores
    # weight-only int4/int8 layers on fused kernels with bf16 activations where the device has them
    # (slimctl.kernels); "off" keeps the dequantize path. Eval in `run` uses the same setting.
    kernels: Literal["auto", "off"] = "auto"
    # causal LMs: also measure decode on a static KV cache with the step under torch.compile (CUDA graphs
    # on GPU). true: report the compiled path; auto: the faster of eager and compiled; both are kept.
    # Off by default: compiling costs about a minute per fresh process on a 2-core CPU.
    compile: bool | Literal["auto"] = False
    skip: bool = False


class Gates(_Strict):
    max_ppl_increase_pct: float | None = Field(default=None, ge=0)
    min_fidelity: float | None = Field(default=None, ge=-1, le=1)
    min_speedup: float | None = Field(default=None, gt=0)
    max_size_ratio: float | None = Field(default=None, gt=0)
    max_task_drop_pct: float | None = Field(default=None, ge=0)  # lm-eval tasks: largest accuracy drop, %
    min_eval_tokens: int = Field(default=1024, ge=0)  # a perplexity gate on fewer scored tokens fails


class Step(BaseModel):
    """One technique application: `method` plus that technique's own options."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    method: str
    config: Any  # the technique's TechniqueConfig instance

    def options(self) -> dict[str, Any]:
        return self.config.model_dump()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options()}


def parse_step(raw: Any) -> Step:
    from . import techniques

    if not isinstance(raw, dict):
        raise ValueError("each step must be a mapping with a 'method' key")
    raw = dict(raw)
    method = raw.pop("method", None)
    if not isinstance(method, str):
        raise ValueError("each step needs 'method' (e.g. method: int8-dynamic)")
    tech = techniques.get(method)
    return Step(method=method, config=tech.config.model_validate(raw))


class Recipe(_Strict):
    version: Literal[1]
    name: str | None = None
    description: str = ""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: list[Step] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    bench: BenchSpec = BenchSpec()
    gates: Gates = Gates()

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError("steps must be a list")
        out = []
        for i, s in enumerate(v):
            try:
                out.append(s if isinstance(s, Step) else parse_step(s))
            except ValidationError as e:  # a technique's own options: keep the step's index in the path
                raise RecipeError(_format_error(e, f"steps[{i}]")) from None
            except ValueError as e:
                raise RecipeError(f"steps[{i}]: {e}") from None
        return out

    @model_validator(mode="after")
    def _cross_step_rules(self) -> "Recipe":
        """Rules that span steps, checked in one place."""
        from . import techniques

        kinds = [techniques.get(s.method).kind for s in self.steps]
        if kinds.count("quantize") > 1:
            raise ValueError("at most one quantization step: a layer can be quantized once")
        if "quantize" in kinds:
            q = kinds.index("quantize")
            later = [self.steps[i].method for i in range(q + 1, len(kinds)) if kinds[i] in ("cast", "prune")]
            if later:
                raise ValueError(f"'{later[0]}' comes after quantization; cast and prune steps must come before it")
        if kinds.count("cast") > 1:
            raise ValueError("at most one cast step (bf16 or fp16)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"steps"})
        d["steps"] = [s.to_dict() for s in self.steps]
        return d


def _format_error(e: ValidationError, prefix: str = "") -> str:
    err = e.errors()[0]
    parts = ([prefix] if prefix else []) + [str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]]
    loc = ".".join(parts).replace(".[", "[")
    if err["type"] == "extra_forbidden":
        where = loc.rpartition(".")[0] or "the top level"
        return f"unknown key '{err['loc'][-1]}' in {where}"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def from_dict(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with version, steps, eval, bench, gates")
    try:
        return Recipe.model_validate(data)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    except ValidationError as e:
        raise RecipeError(f"{source}: {_format_error(e)}") from None


def load(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe {p} does not exist")
    if p.is_dir():
        raise RecipeError(f"recipe {p} is a folder; pass a .yaml file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {p} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {p} is not valid YAML{where}") from None
    return from_dict(data, str(p))


def single_step(method: str, options: dict[str, Any], eval_spec: EvalSpec, bench_spec: BenchSpec,
                seed: int = 0) -> Recipe:
    """The one-step recipe behind `slimctl quantize` and `slimctl prune`."""
    step = {"method": method, **{k: v for k, v in options.items() if v is not None}}
    return from_dict({"version": 1, "name": method, "seed": seed, "steps": [step],
                      "eval": eval_spec.model_dump(), "bench": bench_spec.model_dump()}, "options")
