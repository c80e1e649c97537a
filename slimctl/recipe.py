"""The typed recipe (version 1): steps, eval and bench settings, gates; unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError


from .specs import BenchSpec, EvalSpec, ExportSpec, Gates, Strict  # noqa: F401  (part of the recipe's interface)


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


class Recipe(Strict):
    version: Literal[1]
    name: str | None = None
    description: str = ""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: list[Step] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    bench: BenchSpec = BenchSpec()
    gates: Gates = Gates()
    export: ExportSpec | None = None  # also write OUT/model.gguf (slimctl export --format gguf)
    # stream the model block by block from its safetensors files (peak memory about one block);
    # "auto": when its weights exceed half of the memory available (see stream.should_stream)
    stream: Union[bool, Literal["auto"]] = False
    # where the steps' calibration runs (forwards, statistics, solves: techniques/placement.py); `bench.device`
    # says where the benchmark runs, so a GPU can calibrate a model that is then measured on the CPU
    device: Literal["cpu", "cuda"] = "cpu"

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
                raise RecipeError(format_error(e, f"steps[{i}]")) from None
            except ValueError as e:
                raise RecipeError(f"steps[{i}]: {e}") from None
        return out

    @model_validator(mode="after")
    def _cross_step_rules(self) -> "Recipe":
        """Rules that span steps, checked in one place."""
        from . import techniques

        kinds = [techniques.get(s.method).kind for s in self.steps]
        head = [i for i, s in enumerate(self.steps) if techniques.get(s.method).head_only]
        if len(head) > 1:
            raise ValueError(f"at most one {self.steps[head[0]].method} step: the LM head can be quantized once")
        quant = [i for i, k in enumerate(kinds) if k == "quantize" and i not in head]
        first = techniques.get(self.steps[quant[0]].method) if quant else None
        if len(quant) == 2 and quant[1] == quant[0] + 1 and self.steps[quant[1]].method in first.precedes:
            a, b = self.steps[quant[0]], self.steps[quant[1]]
            self.steps[quant[0]] = Step(method=a.method, config=first.pair(a.config, b.method, b.config, quant[0]))
        elif len(quant) > 1:
            pairs = "; ".join(f"{t.name} directly before {' or '.join(t.precedes)}"
                              for t in techniques.load_all().values() if t.precedes)
            raise ValueError(f"at most one quantization step: a layer can be quantized once (the pairings allowed: {pairs})")
        if "quantize" in kinds:
            q = kinds.index("quantize")
            later = [self.steps[i].method for i in range(q + 1, len(kinds)) if kinds[i] in ("cast", "transform", "prune", "train")]
            if later:
                raise ValueError(f"'{later[0]}' comes after quantization; cast, rotate, prune and distill steps must come before it")
        for i, k in enumerate(kinds):
            if k == "train" and self.steps[i].config.teacher is None and not any(x == "prune" for x in kinds[:i]):
                raise ValueError(f"steps[{i}]: {self.steps[i].method} needs a teacher: put it after a prune step (the "
                                 "teacher is then the model before the recipe's steps) or name one with teacher:")
        if kinds.count("cast") > 1:
            raise ValueError("at most one cast step (bf16 or fp16)")
        if self.export is not None:
            from .formats.exporters import unknown

            if problem := unknown(self.export.format):
                raise ValueError(f"export: {problem}")
        if self.export is not None:  # GGUF stores fp16 scales: choose the codes with them, so the export is exact
            self.steps = [_with_fp16_scales(s) for s in self.steps]
        return self

    def with_overrides(self, max_samples: int | None = None, skip_eval: bool = False, skip_bench: bool = False,
                       compile: bool | str | None = None, seed: int | None = None,
                       stream: bool | str | None = None, device: str | None = None,
                       bench_device: str | None = None) -> "Recipe":
        """This recipe with command-line overrides applied (None / False: keep the recipe's value). `device` moves
        the calibration and, unless `bench_device` says otherwise, the benchmark."""
        bench = self.bench.model_copy(update={"device": bench_device or device or self.bench.device})
        return self.model_copy(update={
            "device": device or self.device,
            "stream": self.stream if stream is None else stream,
            "eval": self.eval.model_copy(update={"max_samples": max_samples or self.eval.max_samples,
                                                 "skip": self.eval.skip or skip_eval}),
            "bench": bench.model_copy(update={"skip": self.bench.skip or skip_bench,
                                              "compile": self.bench.compile if compile is None else compile}),
            "seed": self.seed if seed is None else seed})

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"steps"})
        d["steps"] = [s.to_dict() for s in self.steps]
        return d


def _with_fp16_scales(step: Step) -> Step:
    if "fp16_scales" in type(step.config).model_fields and not step.config.fp16_scales:
        return Step(method=step.method, config=step.config.model_copy(update={"fp16_scales": True}))
    return step


def format_error(e: ValidationError, prefix: str = "") -> str:
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
        raise RecipeError(f"{source}: {format_error(e)}") from None


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
                seed: int = 0, stream: bool | str = False, device: str = "cpu") -> Recipe:
    """The one-step recipe behind `slimctl quantize` and `slimctl prune` (`device`: where it calibrates)."""
    step = {"method": method, **{k: v for k, v in options.items() if v is not None}}
    return from_dict({"version": 1, "name": method, "seed": seed, "steps": [step], "stream": stream, "device": device,
                      "eval": eval_spec.model_dump(), "bench": bench_spec.model_dump()}, "options")
