"""Exporters: a file for another runtime written beside a run's model/ (recipe `export:`) or by `slimctl export`,
behind one protocol that the pipeline and the CLI call without naming a format. A module of formats/ that
defines `EXPORTER` (one instance of the protocol) is an exporter: GGUF for llama.cpp (gguf.py) today."""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Protocol

from .._discover import import_package_modules


class Exporter(Protocol):
    format: str  # the recipe's `export: {format: …}` and `slimctl export --format`
    file: str  # the name a run writes into --out
    runtime: str  # what runs the file, as the run's progress says

    def check(self, config, steps=()) -> None:
        """Refuse an architecture the format cannot hold, or a recipe's `steps` that would make one (before a run
        does any work)."""

    def write(self, loaded, dest: Path, spec) -> Any:
        """Write `loaded` (a LoadedModel or the slimmed model in memory) to `dest` atomically; a result with
        `.notes` (warnings for the report) and `.path`."""

    def summary(self, result) -> dict[str, Any]:
        """What `slimctl export` prints (and --json writes) for a result."""

    def report_entry(self, result, sha256: str) -> dict[str, Any]:
        """The result as a run's report lists it under artifact.exports, with the file's digest."""


@cache
def exporters() -> dict[str, Exporter]:
    """Every exporter, by format: each module of this package that defines EXPORTER."""
    found = (getattr(m, "EXPORTER", None) for m in import_package_modules(__package__, skip=("exporters",)))
    return {e.format: e for e in found if e is not None}


def unknown(fmt: str) -> str | None:
    """What is wrong with an export format name, or None when an exporter has it."""
    known = exporters()
    return None if fmt in known else f"unknown export format '{fmt}'; known: {', '.join(sorted(known))}"


def exporter(fmt: str) -> Exporter:
    from ..errors import UsageError

    if problem := unknown(fmt):
        raise UsageError(problem)
    return exporters()[fmt]
