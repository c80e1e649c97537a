"""`slimctl models` and `slimctl methods`: what is built in."""
from __future__ import annotations

import typer

from . import _common as C


def models(as_json: bool = C.JSON_OPT,
           families: bool = typer.Option(False, "--families", help="List the model families slimctl knows instead "
                                         "(block layouts in slimctl/families/: folds, structured pruning, GGUF).")):
    """List the built-in models and whether they are ready to use offline.

    Examples: [bold]slimctl models --json[/bold]   [bold]slimctl models --families[/bold]
    """
    from ..models import BUILTINS, builtin_status
    from ..render.text import table

    if families:
        from ..families import rows as family_rows

        fams = [{**r, "model_types": ", ".join(r["model_types"])} for r in family_rows()]
        return C.emit(family_rows() if as_json else fams, as_json, lambda rs: table(
            rs, [("family", 11), ("model_types", 32), ("gguf", 7), ("summary", 0)]))
    rows = [{"name": b.name, "status": builtin_status(b.name), "summary": b.summary} for b in BUILTINS.values()]
    C.emit(rows, as_json, lambda rs: table(rs, [("name", 14), ("status", 50), ("summary", 0)]))


def methods(as_json: bool = C.JSON_OPT):
    """List the slimming methods, what they do and what reloads their artifacts.

    Example: [bold]slimctl methods[/bold]
    """
    from ..render.text import table
    from ..techniques import load_all

    rows = [{"name": t.name, "kind": t.kind, "summary": t.summary, "options": sorted(t.config.model_fields),
             "loads_with": t.loads_with, "streams": t.streams, "precedes": list(t.precedes),
             "search_proposes": [p.name for p in t.proposals]}
            for t in sorted(load_all().values(), key=lambda t: (t.kind, t.name))]
    C.emit(rows, as_json, lambda rs: table(rs, [("name", 18), ("kind", 9), ("summary", 0)]))
