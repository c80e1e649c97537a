"""`slimctl search` on a tiny model: pre-filter, sensitivity-driven mixed candidates, full runs,
the winner within budget, the honest failure, and resuming from the cache."""
import json

import pytest

from slimctl import recipe as R
from slimctl.cli.search import parse_drop
from slimctl.results.report import Delta
from slimctl.results.search import CandidateRow
from slimctl.search import SearchOptions, drop, mixed_counts, run_search

EV = R.EvalSpec(max_samples=4, seq_len=64, max_tokens=256)
BE = R.BenchSpec(min_iters=2, min_seconds=0, warmup=1, decode_tokens=2, seq_len=16, batch_size=2, repeats=1)
CANDS = [{"name": "bf16", "steps": [{"method": "bf16"}]},
         {"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 32}]},
         {"name": "prune90", "steps": [{"method": "magnitude", "sparsity": 0.9}]}]


def _search(model, out, max_drop, say=lambda m: None, **kw):
    opts = SearchOptions(model=str(model), out=out, max_drop=max_drop, metric=kw.pop("metric", "fidelity"),
                         objective=kw.pop("objective", "size"), candidates=kw.pop("cands", CANDS), mixed=kw.pop("mixed", 0),
                         eval=EV, bench=BE, **kw)
    return run_search(opts, say)


def test_parse_drop():
    assert parse_drop("1%") == pytest.approx(0.01) and parse_drop("0.02") == 0.02
    with pytest.raises(Exception, match="--max-drop"):
        parse_drop("lots")


def test_search_picks_the_smallest_within_budget_and_resumes(tiny_llama, tmp_path):
    said = []
    res = _search(tiny_llama, tmp_path / "s", 0.005, say=said.append)
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["prune90"]["status"] == "dropped" and "pre-filter" in rows["prune90"]["error"]
    assert rows["bf16"]["status"] == rows["int4"]["status"] == "done"
    # tiny random weights: bf16 keeps every top-1 prediction; int4 changes about 1 % of them (over budget)
    assert res["winner"] == "bf16" and rows["bf16"]["meets_budget"] and not rows["int4"]["meets_budget"]
    assert rows["int4"]["drop"] > 0.005 and rows["bf16"]["drop"] <= 0.005
    assert (tmp_path / "s" / "model" / "slimctl.json").exists() and (tmp_path / "s" / "winner.yaml").exists()
    assert json.loads((tmp_path / "s" / "search.json").read_text())["winner"] == "bf16"
    assert "Pareto-optimal" in (tmp_path / "s" / "search.html").read_text()
    said2 = []
    again = _search(tiny_llama, tmp_path / "s", 0.005, say=said2.append)
    assert again["winner"] == "bf16" and sum("(cached)" in m for m in said2) == 2
    assert len(list((tmp_path / "s" / ".cache" / "prefilter").glob("*.json"))) == 3  # quick looks cached too
    loose = _search(tiny_llama, tmp_path / "s", 0.99, cands=CANDS[2:])  # a cached quick look, judged on this budget
    assert [(r["name"], r["status"]) for r in loose["candidates"]] == [("prune90", "done")]


def test_no_candidate_within_budget_names_the_closest(tiny_llama, tmp_path):
    res = _search(tiny_llama, tmp_path / "s", 0.0, cands=CANDS[1:2], metric="fidelity")
    assert res["winner"] is None
    assert res["closest"]["name"] == "int4" and res["closest"]["missed_by"] > 0
    assert not (tmp_path / "s" / "model").exists()


def test_sensitivity_adds_mixed_precision_candidates(tiny_llama, tmp_path):
    res = _search(tiny_llama, tmp_path / "s", 0.0005, cands=CANDS[1:2], mixed=1)
    sens = res["sensitivity"]
    assert sens and {s["block"] for s in sens} == {"model.layers.0", "model.layers.1"}
    mixed = [r for r in res["candidates"] if r["origin"] == "mixed"]
    blocks = [r for r in mixed if "+float-top" in r["name"]]
    assert blocks and all(any(p.startswith("model.layers.") for p in r["steps"][-1]["ignore"]) for r in blocks)
    # per-Linear allocations of the same int4 (g32: 5 bits per weight) at +0.5 and +1 bit
    linear = {r["name"]: r["steps"][-1] for r in mixed if r["steps"][-1]["method"] == "mixed"}
    assert sorted(linear) == ["int4+mixed-5.5bit", "int4+mixed-6bit"]
    assert all(s["group_size"] == 32 and s["quantizer"] == "rtn" for s in linear.values())
    assert all(r["status"] in ("done", "dropped") for r in mixed)


def test_drop_reads_each_metric():
    assert drop(Delta(perplexity_ratio=1.02), "ppl") == pytest.approx(0.02)
    assert drop(Delta(fidelity=0.97), "fidelity") == pytest.approx(0.03)
    assert drop(Delta(topic_accuracy_change=-0.05), "accuracy") == pytest.approx(0.05)
    assert drop(Delta(accuracy_change=0.01, topic_accuracy_change=-0.05), "accuracy") == pytest.approx(-0.01)
    assert drop(Delta(), "ppl") is None and drop(Delta(perplexity_ratio=1.1), "fidelity") is None


def test_mixed_counts_follow_the_measured_costs():
    sens = [{"block": f"b{i}", "drop": d} for i, d in enumerate([0.02, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001])]
    # whole-model drop 0.027 of which one block costs 0.02/0.027: keeping it alone leaves ~0.007 <= 0.7 x 0.01
    assert mixed_counts(sens, 0.027, 0.01) == [1, 2]
    # costs spread evenly: no k up to half reaches the budget, so only the fixed 1/8 and 1/4 remain
    flat = [{"block": f"b{i}", "drop": 0.01} for i in range(8)]
    assert mixed_counts(flat, 0.08, 0.01) == [1, 2]
    assert all(k <= 4 for k in mixed_counts(flat, 0.08, 0.001))


def test_identical_steps_run_once_and_space_joins_the_candidates(tiny_llama, tmp_path, monkeypatch):
    import slimctl.search.space as S

    # a two-entry space keeps this test short; the union and naming logic is what is under test
    monkeypatch.setattr(S, "default_space", lambda kind: [{"name": "bf16", "steps": [{"method": "bf16"}]},
                                                          {"name": "int8-dynamic", "steps": [{"method": "int8-dynamic"}]}])
    twins = [{"name": "mine-bf16", "steps": [{"method": "bf16"}], "origin": "file"},
             {"name": "int8-dynamic", "steps": [{"method": "bf16"}], "origin": "file"}]
    said = []
    res = _search(tiny_llama, tmp_path / "s", 0.01, say=said.append, objective="latency", cands=twins, with_space=True)
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["int8-dynamic"]["same_as"] == "mine-bf16" and rows["int8-dynamic"]["drop"] == rows["mine-bf16"]["drop"]
    assert rows["bf16"]["same_as"] == "mine-bf16" and rows["bf16"]["origin"] == "space"  # the space joined, deduplicated
    assert rows["space-int8-dynamic"]["origin"] == "space" and rows["space-int8-dynamic"]["same_as"] is None  # a name clash
    assert sum(m.startswith("candidate ") and "bf16" in m for m in said) == 1
    # ranked on the ratio to the original measured beside each candidate
    assert "ratio to the original" in res["ranked_by"] and res["environment"]["versions"]
    for r in res["candidates"]:
        if r.get("objective") is not None:
            assert r["vs_original"] > 0 and r["vs_original"] == pytest.approx(1 / r["speedup"])
    w = rows[res["winner"]]
    assert w["meets_budget"] and all(w["vs_original"] <= r["vs_original"] for r in rows.values() if r.get("meets_budget"))


def test_the_same_recipe_written_two_ways_is_one_candidate():
    from slimctl.search import normalize_steps
    from slimctl.search.cache import digest as _hash

    short = normalize_steps([{"method": "int8-dynamic"}])
    assert short == normalize_steps([{"method": "int8-dynamic", "ignore": []}]) and short[0]["ignore"] == []
    assert _hash(normalize_steps([{"method": "rtn", "bits": 4, "group_size": 64}])) != _hash(normalize_steps([{"method": "rtn", "bits": 4}]))
    assert normalize_steps([{"method": "no-such"}]) == [{"method": "no-such"}]  # left for the run to report


def test_winner_warnings_say_when_slimming_does_not_pay():
    from slimctl.search import winner_warnings

    # the smollm2-135m search's winner (bench-results/search-smollm2.json): 0.97x latency, per-round 0.96-1.03x
    def row(name, vs, rng=None):
        return CandidateRow(name=name, origin="space", steps=[], status="done", vs_original=vs, speedup_range=rng)
    w = row("sq+float-top7", 0.9725, [0.9706, 1.0399])
    (msg,) = winner_warnings(w, "latency", True)
    assert "within the run-to-run noise" in msg and "0.96-1.03x" in msg
    assert winner_warnings(row("sq+float-top7", 0.9725, [1.1, 1.3]), "latency", True) == []  # a clear gain: nothing to say
    (slower,) = winner_warnings(row("int8-wo", 1.19), "latency", True)
    assert "beats the original" in slower and "1.19x" in slower
    assert winner_warnings(row("t", 0.9), "throughput", False)  # less throughput than the original
    assert winner_warnings(row("s", 0.55), "size", True) == []


def test_a_candidate_that_fails_the_reload_gate_never_wins(tiny_llama, tmp_path, monkeypatch):
    """int4 is the smallest and within a loose budget, but its saved artifact does not reproduce the
    model that was measured (injected): it is marked, says why, and bf16 wins instead."""
    import slimctl.workflow.pipeline as P

    real = P.reload_check

    def broken_for_int4(slim, folder, tokenizer, kind):
        out = real(slim, folder, tokenizer, kind)
        return {**out, "max_abs_diff": 0.5, "bitwise_equal": False} if folder.parent.name == "int4" else out
    monkeypatch.setattr(P, "reload_check", broken_for_int4)
    res = _search(tiny_llama, tmp_path / "s", 0.5, cands=CANDS[:2])
    rows = {r["name"]: r for r in res["candidates"]}
    assert rows["int4"]["status"] == "gate failed" and not rows["int4"]["meets_budget"]
    assert rows["int4"]["gates_failed"][0].startswith("artifact_matches_memory: 0.5 is not <= 1e-05")
    assert "gate failed: artifact_matches_memory" in rows["int4"]["error"] and "pareto" not in rows["int4"]
    assert res["winner"] == "bf16"
    again = _search(tiny_llama, tmp_path / "s", 0.5, cands=CANDS[:2])  # the cached report keeps its failed gate
    assert again["winner"] == "bf16" and {r["name"]: r["status"] for r in again["candidates"]}["int4"] == "gate failed"


def test_candidates_equally_fast_within_the_noise_go_to_the_most_accurate():
    """The minilm-l6 searches of bench-results/search-engines.json, local and ray: the same drops, the
    fastest differs between the runs (int8-weight-only, then onnx-int8-dynamic) because their per-round
    latency ranges overlap; both verdicts must name the same winner, the most accurate of the tied."""
    from slimctl.search.rank import verdict

    def rows(speed):
        drops = {"bf16": 4.3e-05, "int8-dynamic": 0.00222, "w8a8-smoothquant": 0.00227, "int8-weight-only": 0.00054,
                 "onnx-int8-dynamic": 0.0051, "int4-mixed": 0.0237}
        return [CandidateRow(name=n, origin="space", steps=[], status="done", drop=d, objective=1.0, vs_original=1 / speed[n][0],
                             speedup_range=list(speed[n][1:]), meets_budget=d <= 0.01) for n, d in drops.items()]

    local = {"bf16": (1.807, 1.771, 1.869), "int8-dynamic": (1.496, 1.275, 1.998), "w8a8-smoothquant": (1.393, 1.276, 1.681),
             "int8-weight-only": (1.851, 1.512, 2.141), "onnx-int8-dynamic": (1.757, 1.734, 1.953), "int4-mixed": (1.999, 1.852, 2.170)}
    ray = {"bf16": (1.814, 1.679, 1.979), "int8-dynamic": (1.627, 1.379, 2.082), "w8a8-smoothquant": (1.454, 1.335, 1.807),
           "int8-weight-only": (1.715, 1.649, 1.889), "onnx-int8-dynamic": (1.859, 1.831, 1.881), "int4-mixed": (1.778, 1.649, 1.801)}
    a, b = verdict(rows(local), "latency", 0.01), verdict(rows(ray), "latency", 0.01)
    assert a.winner.name == b.winner.name == "bf16"
    assert "onnx-int8-dynamic" in a.tied and "int8-weight-only" in b.tied and "w8a8-smoothquant" not in b.tied
    assert any("equally fast within the per-round noise" in w for w in a.warnings)
    clear = rows(local)  # a clear lead (ranges apart) still wins on speed alone
    clear[3].vs_original, clear[3].speedup_range = 1 / 3.0, [2.9, 3.1]
    assert verdict(clear, "latency", 0.01).winner.name == "int8-weight-only" and verdict(clear, "latency", 0.01).tied == []
