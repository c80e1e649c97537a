"""What a search leaves in OUT: search.json, the winner's artifact, report and recipe copied to the top,
winner.yaml, and search.html with every finished candidate (Pareto-optimal ones marked)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..results.search import CandidateRow, SearchResult


def copy_winner(out: Path, src: Path) -> None:
    """The winning candidate's model/, report.json and report.md, copied to the top of OUT."""
    for part in ("model", "report.json", "report.md"):
        dst = out / part
        if dst.is_dir():
            shutil.rmtree(dst)
        if (src / part).is_dir():
            shutil.copytree(src / part, dst)
        elif (src / part).exists():
            shutil.copy2(src / part, dst)


def write(out: Path, result: SearchResult, reports: list[dict[str, Any]], winner: CandidateRow | None) -> None:
    import yaml

    from ..render import write_text

    if winner:
        copy_winner(out, out / "candidates" / (winner.same_as or winner.name))
        write_text(out / "winner.yaml", yaml.safe_dump(result.winner_recipe, sort_keys=False))
    if reports:  # every finished candidate in one page, Pareto-optimal ones marked
        from ..render.html import render

        write_text(out / "search.html", render(reports, title=f"slimctl search · {result.model}", notes=[
            f"winner: {result.winner or 'none within the budget'} (ranked by {result.ranked_by})", *result.warnings]))
        result.html = str(out / "search.html")
    write_text(out / "search.json", json.dumps(result.to_json(), indent=2, default=str) + "\n")
