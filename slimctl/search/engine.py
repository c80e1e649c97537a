"""The search: candidates in order through the pre-filter, sensitivity and full isolated runs (each
stage cached), then the verdict. Full runs go to a runner: here one by one (runners.LocalRunner) or as
Ray tasks (ray_runner.RayRunner). Stages are methods, so each reads at once."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

from .. import recipe as R
from ..errors import Interrupted
from . import output, quick, rank, space
from .cache import Cache, digest, environment, model_hash
from .runners import Job, LocalRunner
from .space import Candidate
from ..results.search import SearchResult


BUDGET_SPENT = "the search's time budget was spent before it started"


class Search:
    def __init__(self, opts, say: Callable[[str], None]):
        self.o, self.say = opts, say
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + opts.budget_minutes * 60 if opts.budget_minutes else None
        self.unshared: list[str] = []

    def over_budget(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def run(self) -> dict[str, Any]:
        try:
            with self.runner_for(self.o) as self.runner:  # a missing Ray or a wrong --address fails before any work
                return self.search()
        except KeyboardInterrupt:  # the runner has cancelled what was running and stopped what it started
            raise Interrupted(f"interrupted; the candidates that finished are kept in {Path(self.o.out) / '.cache'}: "
                              "the same command resumes from them") from None

    def runner_for(self, o):
        if o.engine == "ray":
            from .ray_runner import RayRunner

            return RayRunner(o.address, o.device, o.task_cpus, self.say)
        return LocalRunner()

    def search(self) -> dict[str, Any]:
        from ..models import load

        o = self.o
        self.out = Path(o.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = load(o.model, progress=self.say, **o.load_options)
        self.metric = o.metric or rank.default_metric(self.base.kind)
        self.bench_spec = o.bench or R.BenchSpec(device=o.device)
        self.quick = quick.quick_spec(o.eval, self.base.kind)
        self.cache = Cache(self.out / ".cache", {
            "model": model_hash(Path(self.base.path)), "env": digest(environment(o.device)), "eval": o.eval.model_dump(),
            "bench": self.bench_spec.model_dump(), "seed": o.seed, "metric": self.metric})
        cands = space.candidates(self.base.kind, o.candidates, o.with_space)
        self.prefilter_all(cands)
        sens = self.add_mixed(cands) if o.mixed else None
        self.full_runs([c for c in cands if c.status == "pending" and not c.same_as])
        by_name = {c.name: c for c in cands}
        for c in cands:
            if c.same_as:
                c.follow(by_name[c.same_as])
        return self.verdict(cands, sens)

    def skip(self, c: Candidate) -> bool:
        if self.over_budget():
            c.status, c.error = "skipped", BUDGET_SPENT
            return True
        return False

    def prefilter(self, c: Candidate) -> None:
        """A few batches; the measurement is cached, the verdict follows this run's budget."""
        path = self.cache.quick_path("prefilter", c.steps, self._quick_settings())
        saved = self.cache.get(path)
        if saved is None:
            saved = quick.prefilter(self.base, c.steps, self.metric, self.quick, self.o.seed)
            self.cache.put(path, saved)
        c.prefilter = saved["prefilter"]
        d, cut = c.prefilter.get("drop"), quick.hopeless_above(self.o.max_drop)
        if saved.get("error"):
            c.status, c.error = "failed", saved["error"]
        elif d is not None and d > cut:
            c.status = "dropped"
            c.error = f"pre-filter drop {d:.4f} is hopeless against the budget {self.o.max_drop:.4f} (cut-off {cut:.4f})"

    def _quick_settings(self) -> dict[str, Any]:
        return {"quick": self.quick.model_dump(), "calib": quick.PREFILTER_CALIB}

    def prefilter_all(self, cands: list[Candidate]) -> None:
        seen: dict[str, Candidate] = {}
        for i, c in enumerate(cands):
            if self.skip(c):
                continue
            twin = seen.setdefault(digest(c.steps), c)
            if twin is not c:  # the same steps under another name (a shipped recipe and the space): measured once
                c.same_as = twin.name
                self.say(f"pre-filter {i + 1}/{len(cands)}: {c.name} (same steps as {twin.name})")
                continue
            self.say(f"pre-filter {i + 1}/{len(cands)}: {c.name}")
            self.prefilter(c)
        by_name = {c.name: c for c in cands}
        for c in cands:
            if c.same_as:
                c.follow(by_name[c.same_as])

    def add_mixed(self, cands: list[Candidate]) -> list[dict[str, Any]] | None:
        """Per-block sensitivity of the candidate that missed the budget by the least (when keeping
        blocks in float can plausibly rescue it) → mixed-precision candidates, pre-filtered too."""
        lossy = [c for c in cands if not c.same_as and space.mixable(c, self.o.max_drop)]
        if not lossy or self.over_budget():
            return None
        src = min(lossy, key=lambda c: c.prefilter["drop"])
        self.say(f"per-block sensitivity of {src.name} (pre-filter drop {src.prefilter['drop']:.2%})")
        steps = space.sensitivity_steps(src.steps)
        path = self.cache.quick_path("sensitivity", steps, self._quick_settings())
        sens = self.cache.get(path)
        if sens is not None:
            self.say("sensitivity (cached)")
        else:
            sens = quick.sensitivity(self.base, steps, self.metric, self.quick, self.o.seed, self.say)
            self.cache.put(path, sens)
        for mc in space.mixed_candidates(src, sens, self.o.max_drop) + space.linear_mixed_candidates(src):
            cands.append(mc)
            if not self.over_budget():
                self.say(f"pre-filter {mc.name}")
                self.prefilter(mc)
        return sens

    def full_runs(self, todo: list[Candidate]) -> None:
        """Full, isolated runs of the survivors (cached per model, recipe and environment) on the engine's
        runner; a re-run (after a kill, a Ctrl-C or a spent budget) runs only what is not cached."""
        pending = []
        for i, c in enumerate(todo):
            cached = self.cache.get(self.cache.run_path(c.steps))
            if cached is None:
                pending.append(c)
                continue
            c.report, c.status, c.node = cached, "done", cached.get("node")
            self.say(f"candidate {i + 1}/{len(todo)}: {c.name} (cached)")
        by_name, progress = {c.name: c for c in pending}, _Progress(len(todo) - len(pending), len(todo), self.say)
        self.runner.run([self.job(c) for c in pending], progress.started,
                        lambda job, outcome: self.finished(by_name[job.name], outcome, progress), self.over_budget)
        for c in pending:
            if c.status == "pending":
                c.status, c.error = "skipped", BUDGET_SPENT

    def job(self, c: Candidate) -> Job:
        recipe = {"version": 1, "name": c.name, "seed": self.o.seed, "steps": copy.deepcopy(c.steps),
                  "eval": self.o.eval.model_dump(), "bench": self.bench_spec.model_dump()}
        return Job(c.name, recipe, self.o.model, str(self.out / "candidates" / c.name), dict(self.o.load_options))

    def finished(self, c: Candidate, outcome: dict[str, Any], progress: "_Progress") -> None:
        c.status, c.error, c.node = outcome["status"], outcome["error"], outcome["node"]
        if c.status == "done" and not (self.out / "candidates" / c.name / "report.json").exists():
            self.unshared.append(c.name)  # written on a Ray node whose disk this machine does not see
        if outcome["report"] is not None:
            c.report = {**outcome["report"], "node": outcome["node"]}
            self.cache.put(self.cache.run_path(c.steps), c.report)
        progress.finished(c)

    def verdict(self, cands: list[Candidate], sens) -> dict[str, Any]:
        """The ranked rows and the winner; writes OUT/search.json (and the winner's files) and returns its JSON form."""
        o = self.o
        rows = [rank.row(c, self.metric, o.objective, o.max_drop,
                         str(self.out / "candidates" / (c.same_as or c.name) / "report.json")) for c in cands]
        v = rank.verdict(rows, o.objective, o.max_drop)
        if self.unshared:
            v.warnings.append(f"{self.out} is not on storage shared with the Ray nodes: the artifacts of "
                              f"{', '.join(self.unshared)} stay on the nodes that ran them (same path there)")
        winner = v.winner
        result = SearchResult(model=o.model, metric=self.metric, max_drop=o.max_drop, objective=o.objective,
                              lower_is_better=rank.OBJECTIVES[o.objective][1], candidates=rows, sensitivity=sens,
                              seconds=round(time.perf_counter() - self.t0, 1), winner=winner.name if winner else None,
                              tied=v.tied, ranked_by=v.ranked_by, warnings=v.warnings, environment=environment(o.device),
                              engine=self.runner.describe())
        if winner:
            result.winner_recipe = {"version": 1, "name": winner.name, "steps": winner.steps}
        else:
            result.closest = v.closest
        output.write(self.out, result, [c.report for c in cands if c.report], winner)
        return result.to_json()


class _Progress:
    """One line as each full run starts (with the time left, from the runs finished in this process)
    and one as it ends."""

    def __init__(self, cached: int, total: int, say: Callable[[str], None]):
        self.n, self.total, self.say = cached, total, say
        self.ran, self.ran_s, self.begun = 0, 0.0, {}

    def started(self, job: Job) -> None:
        self.n += 1
        left = self.total - self.n + 1
        eta = f", about {self.ran_s / self.ran * left / 60:.0f} min of runs left" if self.ran else ""
        self.begun[job.name] = time.perf_counter()
        self.say(f"candidate {self.n}/{self.total}: {job.name}{eta}")

    def finished(self, c: Candidate) -> None:
        took = time.perf_counter() - self.begun.pop(c.name, time.perf_counter())
        if c.status == "done":
            self.ran, self.ran_s = self.ran + 1, self.ran_s + took
        where = f" on {c.node['hostname']}" if c.node and c.node.get("ray_node_id") else ""
        self.say(f"  {c.name}: {c.status} in {took:.0f} s{where}" + (f" ({c.error})" if c.error else ""))
