"""The candidates of a search: the built-in space, recipe files, normalised steps (so one recipe written
two ways is one candidate), and the mixed-precision candidates: blocks kept in float from per-block
sensitivity, and per-Linear int4/int8 allocations (the `mixed` method) under a bits-per-weight budget."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipe as R
from ..errors import DataError


def default_space(kind: str) -> list[dict[str, Any]]:
    """Candidate recipes (name, steps) for a model of this kind: what each technique's registration proposes
    (`proposals=` in techniques/registry.py), in the order they declare."""
    from ..techniques import proposals

    return [{"name": p.name, "steps": [{"method": method, **p.options}]} for p, method in proposals(kind)]


@dataclass
class Candidate:
    name: str
    steps: list[dict[str, Any]]
    origin: str = "space"  # space | file | mixed
    prefilter: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    status: str = "pending"  # pending | dropped | done | failed | skipped
    error: str | None = None
    same_as: str | None = None  # measured once under this other candidate's name (identical steps)
    node: dict[str, Any] | None = None  # where its full run ran (search --engine ray: a cluster's node)

    def follow(self, twin: "Candidate") -> None:
        """Take the measurements of the candidate with the same steps."""
        self.prefilter, self.report, self.status, self.error = twin.prefilter, twin.report, twin.status, twin.error
        self.node = twin.node


def normalize_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step with every option spelled out (defaults filled in), so that the same recipe written
    two ways hashes, caches and deduplicates as one. An unknown method or option is left for the
    candidate's own run to report."""
    from .. import techniques

    out = []
    for st in steps:
        try:
            cfg = techniques.get(st["method"]).config(**{k: v for k, v in st.items() if k != "method"})
            out.append({"method": st["method"], **cfg.model_dump()})
        except Exception:  # noqa: BLE001
            out.append(copy.deepcopy(st))
    return out


def candidates(kind: str, given: list[dict[str, Any]] | None, with_space: bool) -> list[Candidate]:
    """The given recipes, plus the built-in space when asked (or when none are given); a space entry
    named like a given recipe is renamed space-NAME."""
    pool = list(given or []) + (default_space(kind) if with_space or not given else [])
    cands = [Candidate(c["name"], normalize_steps(c["steps"]), c.get("origin", "space")) for c in pool]
    names = [c.name for c in cands]
    for c in cands:
        if names.count(c.name) > 1 and c.origin == "space":
            c.name = f"space-{c.name}"
    return cands


def read_candidates(paths: list[Path]) -> list[dict[str, Any]]:
    """Recipe files (or folders of .yaml) as candidates."""
    out = []
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p]
    for p in files:
        r = R.load(p)
        out.append({"name": r.name or Path(p).stem, "steps": [s.to_dict() for s in r.steps], "origin": "file"})
    if not out:
        raise DataError("no candidate recipes")
    return out


def sensitivity_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps whose per-block cost is measured: GPTQ is measured through RTN at the same bits and
    group (GPTQ per block would cost a full calibration each; its error pattern follows RTN's)."""
    out = []
    for st in steps:
        if st["method"] == "gptq":
            st = {"method": "rtn", "bits": st.get("bits", 4), "group_size": st.get("group_size", 128)}
        out.append(copy.deepcopy(st))
    return out


def mixable(c: Candidate, max_drop: float) -> bool:
    """A candidate that missed the budget on the pre-filter by a margin that keeping a few blocks in
    float can plausibly close, and whose last step can leave layers alone (`ignore`)."""
    from .. import techniques

    d = c.prefilter.get("drop")
    if d is None or d <= max_drop or d > max(10 * max_drop, 0.05) or not c.steps or c.status not in ("pending", "dropped"):
        return False
    try:
        return "ignore" in techniques.get(c.steps[-1]["method"]).config.model_fields
    except Exception:  # noqa: BLE001
        return False


def mixed_counts(sens: list[dict[str, Any]], total_drop: float, max_drop: float) -> list[int]:
    """How many of the most sensitive blocks to keep in float: the fewest that the measured per-block
    costs say bring the drop under 70 % of the budget (costs taken as additive, scaled to the
    whole-model drop), plus 1/8 and 1/4 of the blocks; never more than half."""
    n = len(sens)
    costs = sorted((max(s["drop"] or 0.0, 0.0) for s in sens), reverse=True)
    total = sum(costs)
    ks = {max(1, n // 8), max(1, n // 4)}
    if total > 0:
        kept = 0.0
        for k, cst in enumerate(costs, 1):
            kept += cst
            if total_drop * (1 - kept / total) <= 0.7 * max_drop:
                ks.add(k)
                break
    return sorted(k for k in ks if k <= max(1, n // 2))


def mixed_candidates(src: Candidate, sens: list[dict[str, Any]], max_drop: float) -> list[Candidate]:
    """src with its k most sensitive blocks left in float, for each k mixed_counts proposes."""
    order = [s["block"] for s in sorted(sens, key=lambda s: -(s["drop"] or 0))]
    out = []
    for k in mixed_counts(sens, src.prefilter["drop"], max_drop):
        steps = copy.deepcopy(src.steps)
        steps[-1]["ignore"] = list(steps[-1].get("ignore", [])) + [f"{b}.*" for b in order[:k]]
        out.append(Candidate(f"{src.name}+float-top{k}", steps, "mixed"))
    return out


def linear_mixed_candidates(src: Candidate) -> list[Candidate]:
    """src's int4 step (RTN or GPTQ) as a per-Linear `mixed` step: int4 at the same group, int8 for the
    Linears whose measured cost says so, at 0.5 and 1 bit per weight above src's own."""
    from ..techniques.mixed import MixedConfig

    last = src.steps[-1] if src.steps else {}
    if last.get("method") not in ("rtn", "gptq") or last.get("bits") != 4:
        return []
    g = last.get("group_size")
    own = 4 + 32 / g if g else 4.0  # a float32 scale per group (per channel: about 4)
    keep = {k: v for k, v in last.items() if k in MixedConfig.model_fields and k not in ("method", "bits")}
    out = []
    for extra in (0.5, 1.0):
        avg = round(own + extra, 3)
        step = {"method": "mixed", **keep, "avg_bits": avg, "quantizer": last["method"]}
        out.append(Candidate(f"{src.name}+mixed-{avg:g}bit", copy.deepcopy(src.steps[:-1]) + [step], "mixed"))
    return out
