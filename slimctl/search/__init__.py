"""`slimctl search`: the best recipe on an objective (latency, throughput, size, memory, cost) within
an accuracy budget, found by measurement: a cheap pre-filter (quick.py), per-block sensitivity that
yields mixed-precision candidates (space.py), full isolated runs of the survivors cached so a re-run
resumes (cache.py), the verdict as pure functions (rank.py), and the files it leaves (output.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import recipe as R
from .rank import METRICS, OBJECTIVES, default_metric, drop, winner_warnings
from .space import Candidate, default_space, mixed_counts, normalize_steps, read_candidates

__all__ = ["SearchOptions", "run_search", "METRICS", "OBJECTIVES", "default_metric", "drop", "winner_warnings",
           "Candidate", "default_space", "mixed_counts", "normalize_steps", "read_candidates"]


class SearchOptions(BaseModel):
    """Everything a search needs; the CLI builds one from its flags, a Python user directly."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str
    out: Path
    max_drop: float = Field(ge=0, lt=1, description="accuracy budget as a fraction (0.01 = 1 %)")
    metric: Optional[str] = None  # ppl | accuracy | fidelity; None: by model kind
    objective: str = "latency"
    candidates: Optional[list[dict[str, Any]]] = None  # {"name", "steps", "origin"}; None: the built-in space
    with_space: bool = False  # the built-in space as well as the given candidates
    budget_minutes: Optional[float] = Field(None, gt=0)
    device: str = "cpu"
    seed: int = 0
    mixed: bool = True  # add mixed-precision candidates from per-block sensitivity
    load_options: dict[str, Any] = Field(default_factory=dict)
    eval: R.EvalSpec = Field(default_factory=R.EvalSpec)
    bench: Optional[R.BenchSpec] = None  # None: defaults on `device`
    engine: Literal["local", "ray"] = "local"  # where full runs execute: here one by one, or as Ray tasks
    address: Optional[str] = None  # ray: an existing cluster (auto | HOST:PORT | ray://HOST:PORT); None: a local instance
    task_cpus: Optional[float] = Field(None, gt=0)  # ray: CPUs each candidate's task declares; None: a whole node

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        if v not in OBJECTIVES:
            raise ValueError(f"must be one of {', '.join(OBJECTIVES)}")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        host, _, port = v.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"takes auto, HOST:PORT or ray://HOST:PORT, not {v!r}")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> "SearchOptions":
        if self.engine != "ray" and (self.address is not None or self.task_cpus is not None):
            raise ValueError("--address and --task-cpus need --engine ray")
        return self

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in METRICS:
            raise ValueError(f"must be one of {', '.join(METRICS)}")
        return v


def run_search(opts: SearchOptions, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the search described by `opts`; returns the result written to OUT/search.json."""
    from .engine import Search

    return Search(opts, say).run()
