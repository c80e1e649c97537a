"""The `slimctl` command line: an app assembled from one file per command group. Each command parses
options, makes one library call and renders the result; errors are rendered once, here, as one
`Error:` line and the documented exit code.

stdout carries data (tables, or exactly one JSON document with --json); stderr carries progress and
errors. Nothing here imports torch at module level, so `slimctl --help` stays fast.
"""
from __future__ import annotations

import os
import sys
import traceback

import typer

from .._version import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, SlimctlError
from ..heap import own_heap
from . import ci, export, info, measure, search, slim
from ._common import err, out

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    help="Slim Hugging Face models (quantize, prune) and prove it: eval, bench, gates, report, reloadable artifact.\n\n"
         "Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 internal error, 130 interrupted.",
)
for _fn, _name in ((slim.run, "run"), (slim.quantize, "quantize"), (slim.prune, "prune"), (ci.gate, "gate"),
                   (ci.report, "report"), (ci.compare, "compare"), (search.search, "search"), (measure.eval_cmd, "eval"),
                   (measure.bench, "bench"), (info.models, "models"), (info.methods, "methods"), (ci.verify, "verify"), (export.export, "export")):
    app.command(_name, cls={"quantize": slim.QuantizeCommand, "prune": slim.PruneCommand}.get(_name))(_fn)


def _version(value: bool):
    if value:
        out.print(f"slimctl {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes; Typer >= 0.26 carries a private copy of Click."""
    import importlib

    usage, abort = [], []
    for name in ("typer._click", "click"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        exc = getattr(mod, "exceptions", mod)
        usage += [c for c in (getattr(mod, "ClickException", None),) if c]
        abort += [c for c in (getattr(exc, "Abort", None),) if c]
    return tuple(usage), tuple(abort)


def _out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's CPU allocator failing under a memory cap, or CUDA OOM."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def main() -> None:
    """Entry point: renders every error as one `Error:` line and the documented exit code."""
    import signal

    own_heap()  # this process is slimctl's: its heap may be frozen before the first model (heap.py)
    click_usage, click_abort = _click_exceptions()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, fail the write (EFBIG) instead of dying
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    debug = os.environ.get("SLIMCTL_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
        if rc == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into a silent Exit(130)
            err.print("Error: interrupted; no partial artifact was left", markup=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except SlimctlError as e:
        from ..errors import GateFailed

        if isinstance(e, GateFailed):
            for f in e.failed:
                err.print(f"FAIL {f}", markup=False, soft_wrap=True)
        if debug:
            traceback.print_exc()
        err.print(f"Error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except click_abort:
        err.print("Error: interrupted", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except click_usage as e:
        err.print(f"Error: {e.format_message()}", markup=False, soft_wrap=True)
        if getattr(e, "ctx", None) is not None:
            err.print(f"Try '{e.ctx.command_path} --help'.", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("Error: interrupted; no partial artifact was left", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # out of memory is the user's limit; anything else is a bug: say so plainly
        if _out_of_memory(e):
            err.print("Error: out of memory; try a smaller --batch-size or --seq-len, or fewer calibration samples "
                      "(--set calib_samples=16)", markup=False, soft_wrap=True)
            sys.exit(2)
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(f"Error: internal error ({type(e).__name__}: {first[:300]}); rerun with SLIMCTL_DEBUG=1 for the traceback",
                  markup=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
