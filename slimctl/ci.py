"""slimctl as a CI step: regression gates against a stored report, and the outputs CI systems read
(JUnit XML, the GitHub Actions step summary, a self-contained HTML report)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gates as gate_mod
from .errors import DataError, OutputError


@dataclass(frozen=True)
class CIOptions:
    baseline: Path | None = None  # an earlier report.json to compare the slimmed model with
    preset: str | None = None  # mlperf-99 | mlperf-99.9: accuracy at least 99 % / 99.9 % of the baseline report's
    min_quality: float | None = None
    max_latency_increase_pct: float | None = None
    max_memory_increase_pct: float | None = None
    max_size_increase_pct: float | None = None
    junit: Path | None = None
    html: Path | None = None

    def quality(self) -> float | None:
        if self.preset is not None:
            if self.preset not in gate_mod.PRESETS:
                raise DataError(f"--preset must be one of {', '.join(gate_mod.PRESETS)}, not {self.preset!r}")
            return gate_mod.PRESETS[self.preset]
        return self.min_quality

    def any_limit(self) -> bool:
        return any(v is not None for v in (self.preset, self.min_quality, self.max_latency_increase_pct,
                                            self.max_memory_increase_pct, self.max_size_increase_pct))


def read_report(path: Path) -> dict[str, Any]:
    from .report import SCHEMA

    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise DataError(f"report {p} does not exist")
    try:
        rep = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{p} is not a slimctl report (not JSON)") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise DataError(f"{p} is not a slimctl report (schema {SCHEMA} expected)")
    return rep


def apply(report: dict[str, Any], opts: CIOptions, out_dir: Path | None = None) -> dict[str, Any]:
    """Add baseline gates to `report` (rewriting its files in out_dir), then write JUnit, the step
    summary and HTML as asked. Returns the report; report["passed"] covers every gate."""
    from . import report as report_mod

    if opts.baseline is not None:
        if not opts.any_limit():
            raise DataError("--baseline needs at least one limit: --preset, --max-latency-increase, --max-memory-increase, "
                            "--max-size-increase or --min-quality")
        old = read_report(opts.baseline)
        rows = gate_mod.against_baseline(report, old, opts.quality(), opts.max_latency_increase_pct,
                                         opts.max_memory_increase_pct, opts.max_size_increase_pct)
        names = {r["name"] for r in rows}
        report["gates"] = [g for g in report.get("gates", []) if g["name"] not in names] + rows
        report["baseline_report"] = str(opts.baseline)
        report["passed"] = not gate_mod.failures(report["gates"])
        if out_dir is not None:
            report_mod.write(report, out_dir)
    if opts.junit is not None:
        _write(opts.junit, gate_mod.junit(report.get("gates", [])))
    if opts.html is not None:
        from .html import render

        _write(opts.html, render([report]))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(report_mod.markdown(report) + "\n")
        except OSError as e:
            raise OutputError(f"cannot append to GITHUB_STEP_SUMMARY {summary}: {e.strerror}") from None
    return report


def _write(path: Path, text: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
