"""slimctl as a CI step: regression gates against a stored report, and the outputs CI systems read
(JUnit XML, the GitHub Actions step summary, a self-contained HTML report)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results import gates as gate_mod
from ..errors import DataError, OutputError
from ..results.report import Report, as_report


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


def comparison(reports: list[Report], sources: list[Path]) -> list[dict[str, Any]]:
    """`slimctl compare`: the first report's baseline, then each run's slimmed model, Pareto-optimal ones marked."""
    from ..render.html import Point, label, pareto

    pts = [Point.of(reports[0].baseline)] + [Point.of(r.slimmed) for r in reports]
    names = ["baseline"] + [label(r) for r in reports]
    return [{"name": n, "source": str(src) if src else None, "metric": p.metric, "value": p.value,
             "latency_p50_ms": p.latency, "size_mb": p.size, "peak_memory_mb": p.memory,
             "passed": r.passed if r else None, "pareto": f}
            for n, p, f, r, src in zip(names, pts, pareto(pts), [None] + reports, [None] + list(sources))]


def verify_artifact(out_dir: Path) -> tuple[list[str], int]:
    """Re-hash model/ against the report's file list: (what is missing or changed, files checked)."""
    from ..models import file_digest
    from ..results.report import read

    files = read(out_dir).artifact.files
    bad = []
    for f in files:
        p = Path(out_dir) / "model" / f.name
        if not p.exists():
            bad.append(f"{f.name} missing")
        elif file_digest(p) != f.sha256:
            bad.append(f"{f.name} changed")
    return bad, len(files)


def apply(report: Report | dict[str, Any], opts: CIOptions, out_dir: Path | None = None) -> Report:
    """Add baseline gates to `report` (rewriting its files in out_dir), then write JUnit, the step
    summary and HTML as asked. Returns the report; its `passed` covers every gate."""
    from ..render import write_report, write_text
    from ..render.markdown import report as markdown
    from ..results.report import read

    report = as_report(report)
    if opts.baseline is not None:
        if not opts.any_limit():
            raise DataError("--baseline needs at least one limit: --preset, --max-latency-increase, --max-memory-increase, "
                            "--max-size-increase or --min-quality")
        rows = gate_mod.against_baseline(report, read(opts.baseline), opts.quality(), opts.max_latency_increase_pct,
                                         opts.max_memory_increase_pct, opts.max_size_increase_pct)
        names = {r.name for r in rows}
        report.gates = [g for g in report.gates if g.name not in names] + rows
        report.baseline_report = str(opts.baseline)
        report.passed = not gate_mod.failures(report.gates)
        if out_dir is not None:
            write_report(report.to_json(), out_dir)
    if opts.junit is not None:
        write_text(opts.junit, gate_mod.junit(report.gates))
    if opts.html is not None:
        from ..render.html import render

        write_text(opts.html, render([report]))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(markdown(report) + "\n")
        except OSError as e:
            raise OutputError(f"cannot append to GITHUB_STEP_SUMMARY {summary}: {e.strerror}") from None
    return report
