"""Typed results of `slimctl bench` (a study): one model's headline bench, its batch sweep and the
recommendation, cost, a slimmed variant beside it, and the placement across devices. Imports nothing upward."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from .report import BenchResult, Environment, _Open


class Cost(_Open):
    """What a measured throughput costs at a stated (or example) hourly price."""
    hourly_usd: float
    assumption: str
    basis: str
    usd_per_1m_tokens: Optional[float] = None
    usd_per_1m_samples: Optional[float] = None

    @property
    def per_1m(self) -> tuple[float, str]:
        """(USD per 1M, "tokens" or "samples")."""
        if self.usd_per_1m_tokens is not None:
            return self.usd_per_1m_tokens, "tokens"
        return self.usd_per_1m_samples, "samples"


class SweepRow(_Open):
    """One point of a batch sweep: measured (status ok) or why not (out of memory, error)."""
    batch_size: int
    dtype: Optional[str] = None
    cast: Optional[str] = None
    status: str
    error: Optional[str] = None
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    samples_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    cost: Optional[Cost] = None
    result: Optional[BenchResult] = Field(None, exclude=True)  # the full measurement, kept in memory only


class Recommendation(_Open):
    batch_size: Optional[int] = None  # None: no point meets the SLO (the reason says so)
    dtype: Optional[str] = None
    reason: str


class SemiStructured(_Open):
    """A 2:4 point and the same point dense, so the gain is measured, not assumed."""
    layers: Optional[int] = None
    sparse_p50_ms: float
    dense_p50_ms: float
    speedup: float


class VariantRatios(_Open):
    """A slimmed variant against its model, same architecture: >1 speedups are faster, <1 ratios smaller."""
    speedup: Optional[float] = None
    weights_ratio: Optional[float] = None
    peak_memory_ratio: Optional[float] = None
    decode_speedup: Optional[float] = None
    prefill_speedup: Optional[float] = None
    within_noise: Optional[bool] = None


class ConfigOnly(_Open):
    architecture: str
    parameters: Optional[int] = None
    note: str


class BenchStudy(_Open):
    """`slimctl bench` on one device."""
    model: str
    kind: str
    device: str
    isolated: bool
    steps: Optional[list[dict[str, Any]]] = None
    config_only: Optional[ConfigOnly] = None
    sweep: Optional[list[SweepRow]] = None
    recommendation: Optional[Recommendation] = None
    bench: Optional[BenchResult] = None
    semi_structured: Optional[SemiStructured] = None
    cost: Optional[Cost] = None
    warnings: list[str] = Field(default_factory=list)
    slimmed: Optional[BenchStudy] = None  # --recipe: the variant, measured in alternating rounds
    recipe: Optional[str] = None  # a variant's recipe
    vs_baseline: Optional[VariantRatios] = None  # a variant's ratios to its model
    environment: Optional[Environment] = None


class PlacementRow(_Open):
    p95_ms: float
    meets_slo: Optional[bool] = None
    usd_per_1m: float
    unit: str
    hourly_usd: float
    example_price: bool
    batch_size: int


class Placement(_Open):
    """Where to serve the model: the cheapest device that meets the SLO, and the line that says why."""
    devices: dict[str, PlacementRow] = Field(default_factory=dict)
    choice: Optional[str] = None
    line: str


class DeviceStudies(_Open):
    """`slimctl bench --device cpu,cuda`: a study per device and the placement."""
    model: str
    by_device: dict[str, BenchStudy]
    placement: Placement


def parse(data: dict[str, Any] | BenchStudy | DeviceStudies) -> BenchStudy | DeviceStudies:
    """A bench result in its JSON form as the typed model (several devices, or one)."""
    if isinstance(data, (BenchStudy, DeviceStudies)):
        return data
    return (DeviceStudies if "by_device" in data else BenchStudy).model_validate(data)
