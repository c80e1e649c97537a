"""The technique registry: each technique file registers one config class and one apply function.

The registry itself is registry.py; technique files import from there."""
from __future__ import annotations

from .registry import (
    TechniqueConfig, LayerSelection, WeightOnlyOptions, CalibrationOptions, plan_groups, plan_schemes,
    StepContext, Technique, Proposal, REGISTRY, register, load_all, get, proposals,
    protected_modules, select_linears,
)

__all__ = ["TechniqueConfig", "LayerSelection", "WeightOnlyOptions", "CalibrationOptions", "plan_groups",
           "plan_schemes", "StepContext", "Technique", "Proposal", "proposals", "REGISTRY", "register", "load_all", "get",
           "protected_modules", "select_linears"]
