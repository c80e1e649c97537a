"""`slimctl gate`, `report`, `compare`, `verify`: read reports back (validated) for CI and people."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import _common as C


def gate(
    report: Path = typer.Argument(..., help="A report.json (or the run folder holding it)."),
    baseline: Optional[Path] = C.BASELINE_OPT, preset: Optional[str] = C.PRESET_OPT, min_quality: Optional[float] = C.MIN_QUALITY_OPT,
    max_latency_increase: Optional[float] = C.MAX_LAT_OPT, max_memory_increase: Optional[float] = C.MAX_MEM_OPT,
    max_size_increase: Optional[float] = C.MAX_SIZE_OPT, junit: Optional[Path] = C.JUNIT_OPT, html: Optional[Path] = C.HTML_OPT,
    as_json: bool = C.JSON_OPT,
):
    """Check an existing report's gates, and optionally gate it against an earlier report. Exit 1 when a gate fails.

    Examples:
    [bold]slimctl gate runs/new/report.json --baseline runs/release/report.json --preset mlperf-99 --max-latency-increase 10[/bold]
    [bold]slimctl gate runs/new --junit gates.xml[/bold]
    """
    from ..workflow import ci as ci_mod
    from ..results import gates
    from ..errors import UsageError
    from ..render import text
    from ..results.report import read

    opts = C.ci_options(baseline, preset, min_quality, max_latency_increase, max_memory_increase, max_size_increase, junit, html)
    if baseline is None and opts.any_limit():
        raise UsageError("the limits (--preset, --min-quality, --max-*-increase) compare with --baseline; give one")
    rows = ci_mod.apply(read(report), opts, None).gates
    C.emit({"report": str(report), "passed": not gates.failures(rows), "gates": rows}, as_json, lambda d: text.gates(d["gates"]))
    C.fail_on_gates(rows)


def report(
    report: Path = typer.Argument(..., help="A report.json (or the run folder holding it)."),
    html: Path = typer.Option(..., "--html", help="Write the self-contained HTML report here."),
):
    """Render a report as one self-contained HTML file (inline SVG plots, no network).

    Example: [bold]slimctl report runs/minilm-int8/report.json --html runs/minilm-int8/report.html[/bold]
    """
    from ..render import write_text
    from ..render.html import render
    from ..results.report import read

    write_text(html, render([read(report)]))
    C.out.print(f"wrote {html}", markup=False)


def compare(
    reports: List[Path] = typer.Argument(..., help="Two or more report.json files (or run folders)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also draw the comparison as a self-contained HTML file."),
    as_json: bool = C.JSON_OPT,
):
    """One table across runs; the Pareto-optimal ones (no other run is both faster and more accurate) are marked.

    Example: [bold]slimctl compare runs/*/report.json --html compare.html[/bold]
    """
    from ..workflow.ci import comparison
    from ..render import text, write_text
    from ..render.html import render
    from ..results.report import read

    reps = [read(p) for p in reports]
    if html is not None:
        write_text(html, render(reps))
    C.emit({"runs": comparison(reps, reports)}, as_json, lambda d: text.compare(d) + (f"\nwrote {html}" if html else ""))


def verify(out_dir: Path = typer.Argument(..., help="A slimctl output folder (holds report.json and model/).")):
    """Re-hash the artifact's files against its report; exit 1 on any mismatch.

    Example: [bold]slimctl verify runs/minilm-int8[/bold]
    """
    from ..workflow.ci import verify_artifact
    from ..errors import GateFailed

    bad, n = verify_artifact(out_dir)
    if bad:
        raise GateFailed(bad)
    C.out.print(f"ok: {n} files match {out_dir / 'report.json'}", markup=False)
