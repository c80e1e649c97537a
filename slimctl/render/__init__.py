"""Renderers: every result type as text (terminal), Markdown (PR comments, CI summaries) and HTML
(one self-contained page), plus the atomic writes of rendered files. Nothing here measures."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import OutputError


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (a temporary beside it, then rename); a failure is an OutputError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):  # a typed result: its JSON form
        return o.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_default) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """report.json and report.md into out_dir."""
    from .markdown import report as markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "report.json", out_dir / "report.md"
    write_text(j, to_json(report))
    write_text(m, markdown(report))
    return j, m
