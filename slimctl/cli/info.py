"""`slimctl models` and `slimctl methods`: what is built in."""
from __future__ import annotations

from . import _common as C


def models(as_json: bool = C.JSON_OPT):
    """List the built-in models and whether they are ready to use offline.

    Example: [bold]slimctl models --json[/bold]
    """
    from ..models import BUILTINS, builtin_status
    from ..render.text import table

    rows = [{"name": b.name, "status": builtin_status(b.name), "summary": b.summary} for b in BUILTINS.values()]
    C.emit(rows, as_json, lambda rs: table(rs, [("name", 14), ("status", 50), ("summary", 0)]))


def methods(as_json: bool = C.JSON_OPT):
    """List the slimming methods, what they do and what reloads their artifacts.

    Example: [bold]slimctl methods[/bold]
    """
    from ..render.text import table
    from ..techniques import load_all

    rows = [{"name": t.name, "kind": t.kind, "summary": t.summary, "options": sorted(t.config.model_fields)}
            for t in sorted(load_all().values(), key=lambda t: (t.kind, t.name))]
    C.emit(rows, as_json, lambda rs: table(rs, [("name", 18), ("kind", 9), ("summary", 0)]))
