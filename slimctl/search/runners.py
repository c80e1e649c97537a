"""Where a search's full runs execute. A `Job` is one candidate's full run (apply -> eval -> isolated
bench) as plain data; `run_job` runs it in whichever process holds it and returns an outcome. The
local runner calls it here, one job after another; `ray_runner.RayRunner` sends each job to a Ray
task. The engine, the cache and the verdict see the same outcomes either way."""
from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

Outcome = dict[str, Any]  # {"status": "done" | "failed", "report": dict | None, "error": str | None, "node": dict}
Started = Callable[["Job"], None]
Finished = Callable[["Job", Outcome], None]


@dataclass
class Job:
    """One candidate's full run, picklable: what a Ray task receives."""
    name: str
    recipe: dict[str, Any]
    model: str
    out: str
    load_options: dict[str, Any] = field(default_factory=dict)


def node() -> dict[str, Any]:
    """The machine a job ran on: speed figures compare only between identical nodes."""
    from ..machine import cpu_name, physical_cpus

    info = {"hostname": platform.node(), "cpu": cpu_name(), "cpus": physical_cpus()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info.update(ray_node_id=ctx.get_node_id(), ip=ray.util.get_node_ip_address())
    except ImportError:
        pass
    return info


def error_text(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def run_job(job: Job, catch: tuple[type[BaseException], ...] = (Exception,)) -> Outcome:
    """The candidate's full run in this process. An error of a type in `catch` is a result (a candidate
    that cannot run on this model); anything else propagates (Ray then retries the task once)."""
    from ..workflow import pipeline
    from .. import recipe as R

    try:
        recipe = R.from_dict(copy.deepcopy(job.recipe), f"candidate {job.name}")
        # a failed gate is judged at the verdict; the report is written either way
        report = pipeline.run(recipe, job.model, Path(job.out), overwrite=True, load_options=job.load_options)
    except catch as e:
        return {"status": "failed", "report": None, "error": error_text(e), "node": node()}
    return {"status": "done", "report": report, "error": None, "node": node()}


class LocalRunner:
    """Jobs in this process, one after another, in order (the default engine)."""

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"engine": "local", "address": None, "nodes": [node()]}

    def run(self, jobs: Iterable[Job], started: Started, finished: Finished, stop: Callable[[], bool]) -> None:
        for job in jobs:
            if stop():
                return
            started(job)
            finished(job, run_job(job))
