"""`slimctl search`: the best recipe on an objective within an accuracy budget, by measurement."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from . import _common as C


def search(
    model: str = C.MODEL_ARG,
    more: Optional[List[Path]] = typer.Argument(None, hidden=True),  # the rest of a shell glob: --candidates recipes/*.yaml
    max_drop: str = typer.Option(..., "--max-drop", help="Accuracy budget: 1% or 0.01 (perplexity increase, accuracy drop, or 1 - fidelity)."),
    out_dir: Path = C.OUT_OPT,
    metric: Optional[str] = typer.Option(None, "--metric", help="ppl, accuracy or fidelity (default: ppl for causal LMs, fidelity for encoders)."),
    objective: str = typer.Option("latency", "--objective", help="latency, throughput, size, memory or cost."),
    candidates: Optional[List[Path]] = typer.Option(None, "--candidates", help="Candidate recipes: files or a folder of .yaml (recipes/*.yaml works); default: the built-in space."),
    space: Optional[str] = typer.Option(None, "--space", help="default: the built-in space (also alongside --candidates); none: only --candidates."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop starting new candidates after this long."),
    mixed: int = typer.Option(1, "--mixed", help="1: add mixed-precision candidates from per-block sensitivity; 0: do not."),
    engine: str = typer.Option("local", "--engine", help="local: full runs here, one after another; ray: each a Ray task (the ray extra; scripts/setup.sh installs it)."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: an existing Ray cluster (auto, HOST:PORT, ray://HOST:PORT); default: a local instance slimctl starts and stops."),
    task_cpus: Optional[float] = typer.Option(None, "--task-cpus", help="With --engine ray: CPUs each candidate declares (default: a whole node, so benchmarks never share cores)."),
    max_samples: Optional[int] = C.MAX_SAMPLES_OPT, device: str = C.DEVICE_OPT, seed: int = C.SEED_OPT, as_json: bool = C.JSON_OPT,
    allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT, allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Find the recipe that is best on an objective and stays within an accuracy budget, by measurement.

    A pre-filter on a few batches drops hopeless candidates; per-block sensitivity adds mixed-precision
    candidates (the most sensitive blocks kept in float); the rest run in full, isolated, cached in
    --out so a re-run resumes. Exit 1 when no candidate meets the budget (the closest is named).

    Candidates are ranked on the objective as a ratio to the original model, which every candidate's
    run measures in alternating rounds beside it (the machine's speed drifts between candidates).

    Example: [bold]slimctl search minilm-l6 --max-drop 1% --objective latency --out runs/search-minilm[/bold]

    Example: [bold]slimctl search smollm2-135m --max-drop 1% --candidates recipes/*.yaml --space default --out runs/s[/bold]

    Example: [bold]slimctl search minilm-l6 --max-drop 1% --engine ray --address auto --out /shared/runs/s[/bold]
    (each candidate a Ray task on an existing cluster; --out must be on storage every node sees at the same path)
    """
    from ..errors import GateFailed
    from ..render import text
    from ..search import SearchOptions, read_candidates, run_search

    budget = parse_drop(max_drop)
    if space not in (None, "default", "none"):
        raise UsageError(f"--space takes default or none, not {space!r}")
    if space == "none" and not candidates:
        raise UsageError("--space none needs --candidates")
    if engine != "ray" and (address is not None or task_cpus is not None):
        raise UsageError("--address and --task-cpus need --engine ray")
    if more and not candidates:
        raise UsageError(f"unexpected argument(s) after the model: {' '.join(map(str, more))}")
    opts = C.typed(SearchOptions, model=model, out=out_dir, max_drop=budget, metric=metric, objective=objective,
                   candidates=read_candidates(list(candidates) + list(more or [])) if candidates else None,
                   with_space=space == "default", budget_minutes=budget_minutes, device=device, seed=seed, mixed=bool(mixed),
                   load_options=C.load_opts(allow_pickle, trust_remote_code, allow_non_finite),
                   eval=C.spec("EvalSpec", max_samples=max_samples), bench=C.spec("BenchSpec", device=device),
                   engine=engine, address=address, task_cpus=task_cpus)
    res = run_search(opts, C.UI().say)
    C.emit(res, as_json, lambda r: text.search(r, out_dir))
    if not res["winner"]:
        c = res.get("closest")
        why = (f"the closest is {c['name']}, {c['drop']:.2%} drop, over the budget by {c['missed_by']:.2%}" if c
               else "no candidate finished")
        raise GateFailed([f"no candidate meets {res['metric']} drop <= {res['max_drop']:.2%}; {why}"])


def parse_drop(text: str) -> float:
    """--max-drop: '1%' → 0.01, '0.01' → 0.01."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"--max-drop takes a fraction (0.01) or a percentage (1%), not {text!r}") from None
    if not 0 <= v < 1:
        raise UsageError("--max-drop must lie in [0, 100%)")
    return v
