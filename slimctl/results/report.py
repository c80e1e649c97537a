"""Typed results: bench, eval, delta, gate rows and the run report (schema slimctl.report/v1), the JSON
Schema generated from them, and reading a report back with validation. Imports nothing upward.

The models are open (`extra="allow"`): every field slimctl writes is declared and typed; fields a
later version adds still load. Reports are stored and exchanged as their JSON form (a dict), which
`Report.model_validate` checks and `Report` gives attribute access to."""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DataError

SCHEMA = "slimctl.report/v1"
_PACKAGES = ("slimctl", "torch", "transformers", "safetensors", "pydantic", "onnxruntime", "numpy")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON form, as written (report.json, search.json, --json): the fields that were set."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Stats(_Open):
    """A latency distribution in milliseconds."""
    p50: float
    p90: Optional[float] = None
    p95: Optional[float] = None
    p99: Optional[float] = None
    mean: Optional[float] = None
    stdev: Optional[float] = None
    count: Optional[int] = None
    values: Optional[list[float]] = None  # a phase's raw samples (pooling and the HTML distribution read them)


class Throughput(_Open):
    samples_per_s: float
    tokens_per_s: Optional[float] = None


class KernelPlan(_Open):
    """How a quantized model's Linears run (quant.kernels): fused kernels by name, layers left on the dequantize path."""
    device: Optional[str] = None
    act_dtype: Optional[str] = None
    fused_layers: int = 0
    kernels: dict[str, int] = Field(default_factory=dict)
    dense_copy_mb: Optional[float] = None
    dequantize_layers: int = 0
    dequantize: dict[str, str] = Field(default_factory=dict)
    warning: Optional[str] = None


class PhaseResult(_Open):
    """One measured phase of a bench (request, prefill, decode_step, forward): latency with its raw samples."""
    latency_ms: Stats
    peak_memory_mb: Optional[float] = None
    samples_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    items_per_call: Optional[int | float] = None
    tokens_per_call: Optional[int | float] = None


class BenchResult(_Open):
    """One model's speed and memory on one device (pooled over fresh-process rounds in a run)."""
    device: str
    threads: Optional[int] = None
    batch_size: int
    seq_len: int
    dtype: Optional[str] = None  # None: a graph run by another runtime (ONNX)
    latency_ms: Stats
    latency_of: str = Field(description="the phase the latency is of: request, forward, …")
    throughput: Throughput
    peak_memory_mb: float
    size_mb: Optional[float] = None
    prefill_ms: Optional[Stats] = None
    decode_tokens_per_s: Optional[float] = None
    prefill_tokens_per_s: Optional[float] = None
    decode_mode: Optional[str] = None
    modes: Optional[dict[str, BenchResult]] = None  # causal LM: every decode path measured (eager, compiled)
    compile_seconds: Optional[float] = None  # a compiled decode path: its compile time (in no latency)
    rounds_p50_ms: list[float] = Field(default_factory=list)
    rounds_decode_tokens_per_s: Optional[list[float]] = None
    spread_p50_ms: Optional[list[float]] = None
    kernels: Optional[KernelPlan] = None
    onnx_cpu_fallback: Optional[bool] = None
    roofline: Optional[dict[str, Any]] = None
    phases: dict[str, PhaseResult] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    weights_in_memory_mb: Optional[float] = None
    rss_before_mb: Optional[float] = None
    decode_tokens: Optional[int] = None
    semi_structured_layers: Optional[int] = None
    kv_cache: Optional[str] = None
    kv_bytes_per_token: Optional[float] = None
    kv_bytes_measured: Optional[bool] = None
    kv_cache_mb: Optional[float] = None


class TaskResult(_Open):
    """One lm-evaluation-harness task: metrics with stderr, and the drop of its primary metric."""
    samples: int
    source: str
    primary: Optional[str] = None
    metrics: dict[str, Optional[float]]
    reference_metrics: Optional[dict[str, Optional[float]]] = None
    drop_pct: Optional[float] = None


class EvalResult(_Open):
    """One side's accuracy: its metrics, and (slimmed side) its agreement with the baseline."""
    kind: str
    dataset: str
    settings: dict[str, Any] = Field(default_factory=dict)
    metrics: Optional[dict[str, Optional[float]]] = None
    vs_reference: Optional[dict[str, Optional[float]]] = None
    tasks: Optional[dict[str, TaskResult]] = None
    kernels: Optional[KernelPlan] = None
    seconds: Optional[float] = None
    warnings: list[str] = Field(default_factory=list)

    def side(self, reference: bool) -> "EvalResult":
        """One side of a side-by-side evaluation as a report holds it: the reference's own metrics without
        the agreement and kernel facts, or the evaluated model's with them."""
        data = self.model_dump(exclude_unset=True, exclude={"reference_metrics"}
                               | ({"vs_reference", "kernels"} if reference else set()))
        return EvalResult.model_validate({**data, "metrics": self.reference_metrics if reference else self.metrics})


class ModelEval(EvalResult):
    """`slimctl eval`: one model's evaluation, against a reference model when one was given."""
    model: str
    against: Optional[str] = None


class StageCost(_Open):
    """Where part of a step's time went (slimctl.stages): exclusive seconds, share of the step, the FLOPs
    done and their rate, and that rate as a % of the machine's measured fp32 matmul peak when known."""
    stage: str
    seconds: float
    share: Optional[float] = None
    gflop: Optional[float] = None
    gflops_per_s: Optional[float] = None
    pct_of_matmul_peak: Optional[float] = None


class StepRecord(_Open):
    """A recipe step as it ran: options, time, memory, and the technique's own statistics."""
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    seconds: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    added_rss_mb: Optional[float] = None
    loads_with: Optional[str] = None
    layers_changed: Optional[int] = None  # weight-holding modules the step replaced or changed in place
    time_breakdown: Optional[list[StageCost]] = None  # calibrated steps: seconds and FLOPs per stage
    calibration_precision: Optional[str] = None  # "bfloat16" when the calibration forwards ran under bf16 autocast


class Side(_Open):
    eval: Optional[EvalResult] = None
    bench: Optional[BenchResult] = None
    steps: list[StepRecord] = Field(default_factory=list)


class Delta(_Open):
    """Slimmed relative to baseline, measured in the same run."""
    perplexity_ratio: Optional[float] = None
    perplexity_increase_pct: Optional[float] = None
    top1_agreement: Optional[float] = None
    kl_divergence: Optional[float] = None
    mean_cosine: Optional[float] = None
    fidelity: Optional[float] = None
    tokens_scored: Optional[int] = None
    task_drop_pct: Optional[float] = None
    accuracy_change: Optional[float] = None
    topic_accuracy_change: Optional[float] = None
    speedup: Optional[float] = None
    speedup_range: Optional[list[float]] = None
    speedup_within_noise: Optional[bool] = None
    throughput_ratio: Optional[float] = None
    peak_memory_ratio: Optional[float] = None
    decode_speedup: Optional[float] = None
    prefill_speedup: Optional[float] = None
    size_ratio: Optional[float] = None


class GateRow(_Open):
    """One gate: threshold, measured value, verdict (None: not applicable to this run)."""
    name: str
    threshold: Optional[float] = None
    value: Optional[float] = None
    passed: Optional[bool] = None
    sense: Optional[str] = None
    meaning: Optional[str] = None
    note: Optional[str] = None
    reason: Optional[str] = None
    within_noise: Optional[bool] = None
    range: Optional[list[float]] = None  # the per-round values a noise-aware verdict read


class ArtifactFile(_Open):
    name: str
    sha256: str


class Artifact(_Open):
    path: str
    loads_with: str
    files: list[ArtifactFile] = Field(default_factory=list)
    reload_check: Optional[dict[str, Any]] = None
    exports: list[dict[str, Any]] = Field(default_factory=list)  # e.g. model.gguf: path, bytes, sha256, exact layers


class ModelInfo(_Open):
    source: str
    path: Optional[str] = None
    kind: str


class Environment(_Open):
    """Where a run ran: package versions, platform, device and seed; threads and CPU once torch is in use."""
    versions: dict[str, str] = Field(default_factory=dict)
    platform: Optional[str] = None
    device: Optional[str] = None
    seed: Optional[int] = None
    threads: Optional[int] = None
    cpu: Optional[str] = None
    cpus_available: Optional[int] = None
    gpu: Optional[str] = None


class Report(_Open):
    """A run: baseline and slimmed side by side, their delta, the gates, the artifact."""
    schema_: str = Field(SCHEMA, alias="schema", description=f"always {SCHEMA}")
    model: ModelInfo
    recipe: dict[str, Any] = Field(default_factory=dict)
    environment: Environment = Field(default_factory=Environment)
    baseline: Side = Field(default_factory=Side)
    slimmed: Side = Field(default_factory=Side)
    delta: Delta = Field(default_factory=Delta)
    gates: list[GateRow] = Field(default_factory=list)
    passed: Optional[bool] = None
    warnings: list[str] = Field(default_factory=list)
    artifact: Optional[Artifact] = None
    seconds: Optional[float] = None
    baseline_report: Optional[str] = None  # slimctl ci --baseline / run --baseline: the report gated against
    memory: Optional[dict[str, Any]] = None  # a streamed run: its peak memory beside the model's size


def as_report(r: "Report | dict[str, Any]") -> Report:
    """A report as the typed model (a dict is its JSON form, validated; a Report comes back as it is)."""
    return Report.model_validate(r)


def first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def schema_problem(data: dict[str, Any]) -> str | None:
    """Where a report slimctl built deviates from its own schema (a bug), or None."""
    try:
        Report.model_validate(data)
    except ValidationError as e:
        return first_error(e)
    return None


def validate(data: Any, where: str = "report") -> Report:
    """A report dict checked against the schema; a mismatch is a DataError naming the field."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataError(f"{where} is not a slimctl report (schema {SCHEMA} expected)")
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        raise DataError(f"{where} is not a valid slimctl report: {first_error(e)}") from None


def read(path: Path) -> Report:
    """report.json (or the folder holding it), validated: the typed report."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise DataError(f"report {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{p} is not a slimctl report (not JSON)") from None
    return validate(data, str(p))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of slimctl.report/v1, generated from the models (shipped as docs/report.schema.json)."""
    s = Report.model_json_schema(by_alias=True)
    s["$id"] = "https://slimctl.dev/schema/report-v1.json"
    s["title"] = SCHEMA
    return s


def environment(seed: int, device: str = "cpu") -> dict[str, Any]:
    versions = {"python": sys.version.split()[0]}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {"versions": versions, "platform": platform.platform(), "device": device, "seed": seed}
    if "torch" in sys.modules:  # only describe threads/devices when torch is already in use
        import torch

        from ..machine import cpu_name

        env["threads"] = torch.get_num_threads()
        env["cpu"] = cpu_name()
        env["cpus_available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def floor_percentages(roofline: dict[str, Any]) -> list[float]:
    """The % of a roofline floor each phase of a bench result reached (decode: bandwidth; prefill or
    forward: compute); above 100 % means a measured peak is wrong."""
    return [v for k, v in roofline.items() if k.endswith(("_pct_of_bandwidth_floor", "_pct_of_compute_floor"))]


def pareto_front(points: list[tuple[float, ...] | None]) -> list[bool]:
    """True for each point no other point dominates; every coordinate is lower-is-better and a point
    of None (not measured) is never on the front. The one Pareto rule of search, compare and HTML."""
    flags = []
    for p in points:
        flags.append(p is not None and not any(
            o is not None and o is not p and all(a <= b for a, b in zip(o, p)) and any(a < b for a, b in zip(o, p))
            for o in points))
    return flags


if __name__ == "__main__":  # python -m slimctl.results.report > docs/report.schema.json
    print(json.dumps(json_schema(), indent=2))
