"""Gates: direction, not-applicable rows, noise-aware speed gates, one-line failure reasons."""
from slimctl.results import gates
from slimctl.results.report import Delta


def test_gate_directions_and_failures():
    rows = gates.check({"max_ppl_increase_pct": 5, "min_fidelity": 0.99, "min_speedup": None, "max_size_ratio": 0.5},
                       Delta(perplexity_increase_pct=7.5, fidelity=0.995, size_ratio=0.5))
    by = {r.name: r for r in rows}
    assert by["max_ppl_increase_pct"].passed is False and by["min_fidelity"].passed is True
    assert by["max_size_ratio"].passed is True and "min_speedup" not in by
    assert gates.failures(rows) == ["max_ppl_increase_pct: 7.5 is not <= 5"]


def test_not_applicable_is_neither_pass_nor_fail():
    rows = gates.check({"max_ppl_increase_pct": 5}, Delta(fidelity=0.99))
    assert rows[0].passed is None and "not applicable" in rows[0].note and not gates.failures(rows)


def test_speed_gate_is_noise_aware():
    inside = gates.check({"min_speedup": 1.0}, Delta(speedup=0.95, speedup_range=[0.85, 1.1]))[0]
    assert inside.passed is True and inside.within_noise is True and inside.range == [0.85, 1.1]
    outside = gates.check({"min_speedup": 1.0}, Delta(speedup=0.8, speedup_range=[0.75, 0.9]))[0]
    assert outside.passed is False
    assert gates.failures([outside]) == ["min_speedup: 0.8 is not >= 1"]


def test_junit_has_one_case_per_gate_with_failure_and_skip():
    rows = gates.check({"max_ppl_increase_pct": 5, "min_fidelity": 0.99}, Delta(perplexity_increase_pct=7.5))
    xml = gates.junit(rows)
    assert 'tests="2" failures="1" skipped="1"' in xml and "max_ppl_increase_pct: 7.5 is not &lt;= 5" in xml
