"""The local search engine: candidates in order through the pre-filter, sensitivity and full isolated
runs (each stage cached), then the verdict. Stages are methods, so each reads at once."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

from .. import recipe as R
from . import output, quick, rank, space
from .cache import Cache, digest, environment, model_hash
from .space import Candidate


class Search:
    def __init__(self, opts, say: Callable[[str], None]):
        self.o, self.say = opts, say
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + opts.budget_minutes * 60 if opts.budget_minutes else None

    def over_budget(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def run(self) -> dict[str, Any]:
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
            c.status, c.error = "skipped", "the search's time budget was spent before it started"
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
        """Full, isolated runs of the survivors (cached per model, recipe and environment)."""
        ran, ran_s = 0, 0.0  # full runs done in this process and their time: the estimate ignores cached ones
        for i, c in enumerate(todo):
            if self.skip(c):
                continue
            path = self.cache.run_path(c.steps)
            cached = self.cache.get(path)
            if cached is not None:
                c.report, c.status = cached, "done"
                self.say(f"candidate {i + 1}/{len(todo)}: {c.name} (cached)")
                continue
            eta = f", about {ran_s / ran * (len(todo) - i) / 60:.0f} min left" if ran else ""
            self.say(f"candidate {i + 1}/{len(todo)}: {c.name}{eta}")
            started = time.perf_counter()
            self.full_run(c, path)
            if c.status == "done":
                ran, ran_s = ran + 1, ran_s + time.perf_counter() - started

    def full_run(self, c: Candidate, cache_path: Path) -> None:
        from .. import pipeline

        recipe = R.from_dict({"version": 1, "name": c.name, "seed": self.o.seed, "steps": copy.deepcopy(c.steps),
                              "eval": self.o.eval.model_dump(), "bench": self.bench_spec.model_dump()}, f"candidate {c.name}")
        try:
            # a failed gate is judged at the verdict; the report is written either way
            c.report = pipeline.run(recipe, self.o.model, self.out / "candidates" / c.name, overwrite=True,
                                    load_options=self.o.load_options)
            c.status = "done"
            self.cache.put(cache_path, c.report)
        except Exception as e:  # noqa: BLE001  a candidate that cannot run on this model is a result
            c.status, c.error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    def verdict(self, cands: list[Candidate], sens) -> dict[str, Any]:
        o = self.o
        rows = [rank.row(c, self.metric, o.objective, o.max_drop,
                         str(self.out / "candidates" / (c.same_as or c.name) / "report.json")) for c in cands]
        v = rank.verdict(rows, o.objective, o.max_drop)
        winner = v["winner"]
        result = {"model": o.model, "metric": self.metric, "max_drop": o.max_drop, "objective": o.objective,
                  "lower_is_better": rank.OBJECTIVES[o.objective][1], "candidates": rows, "sensitivity": sens,
                  "seconds": round(time.perf_counter() - self.t0, 1), "winner": winner["name"] if winner else None,
                  "ranked_by": v["ranked_by"], "warnings": v["warnings"], "environment": environment(o.device)}
        if winner:
            result["winner_recipe"] = {"version": 1, "name": winner["name"], "steps": winner["steps"]}
        else:
            result["closest"] = v["closest"]
        output.write(self.out, result, [c.report for c in cands if c.report], winner)
        return result
