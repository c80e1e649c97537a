"""Typed results of `slimctl search`: one row per candidate, the verdict (winner, ties, closest miss) and
the whole result written to OUT/search.json. Imports nothing upward."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from .report import _Open


class CandidateRow(_Open):
    """One candidate: where it came from, how far it got, its drop and objective, and why it lost."""
    name: str
    origin: str
    steps: list[dict[str, Any]]
    status: str  # pending | dropped | done | failed | skipped | gate failed
    error: Optional[str] = None
    prefilter_drop: Optional[float] = None
    prefilter: dict[str, Any] = Field(default_factory=dict)
    same_as: Optional[str] = None
    node: Optional[dict[str, Any]] = None
    drop: Optional[float] = None
    objective: Optional[float] = None
    vs_original: Optional[float] = None  # the objective as a ratio to the original, measured in the same run
    speedup: Optional[float] = None
    speedup_range: Optional[list[float]] = None
    size_ratio: Optional[float] = None
    report: Optional[str] = None
    meets_budget: Optional[bool] = None
    gates_failed: Optional[list[str]] = None
    pareto: Optional[bool] = None


class Closest(_Open):
    name: str
    drop: float
    missed_by: float


class Verdict(_Open):
    winner: Optional[CandidateRow] = None
    tied: list[str] = Field(default_factory=list)
    ranked_by: str
    warnings: list[str] = Field(default_factory=list)
    closest: Optional[Closest] = None


class SearchResult(_Open):
    """OUT/search.json."""
    model: str
    metric: str
    max_drop: float
    objective: str
    lower_is_better: bool
    candidates: list[CandidateRow]
    sensitivity: Optional[list[dict[str, Any]]] = None
    seconds: float
    winner: Optional[str] = None
    tied: list[str] = Field(default_factory=list)
    ranked_by: str
    warnings: list[str] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    engine: Optional[dict[str, Any]] = None
    winner_recipe: Optional[dict[str, Any]] = None
    closest: Optional[Closest] = None
    html: Optional[str] = None
