"""slimctl as a CI step: the gate flow's exit codes, JUnit XML, the step summary, the HTML report
rendered by headless Chromium, and compare's Pareto marks."""
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import bench_result, run_cli, typed_report

from slimctl.results import gates
from slimctl.render.html import Point, pareto


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Two real runs on the tiny model: int8-dynamic and 90 % magnitude pruning."""
    import yaml

    base = tmp_path_factory.mktemp("ci")
    out = {}
    for name, step in (("int8", {"method": "int8-dynamic"}), ("mag90", {"method": "magnitude", "sparsity": 0.9})):
        doc = {"version": 1, "name": name, "steps": [step], "eval": {"max_samples": 4, "seq_len": 64, "max_tokens": 256},
               "bench": {"min_iters": 3, "min_seconds": 0, "warmup": 1, "decode_tokens": 4, "seq_len": 16, "batch_size": 2},
               "gates": {"min_fidelity": 0.1}}
        (base / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        p = run_cli("run", base / f"{name}.yaml", "--model", tiny_llama, "--out", base / name, "--inline",
                    "--junit", base / f"{name}.xml", "--html", base / f"{name}.html")
        assert p.returncode == 0, p.stderr
        out[name] = base / name
    out["base"] = base
    return out


def test_gate_flow_passes_then_fails_with_exit_codes_and_junit(runs, tmp_path):
    ok = run_cli("gate", runs["int8"], "--baseline", runs["int8"] / "report.json", "--preset", "mlperf-99",
                 "--max-latency-increase", "10", "--max-size-increase", "0", "--junit", tmp_path / "ok.xml")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("gate", runs["mag90"], "--baseline", runs["int8"] / "report.json", "--preset", "mlperf-99.9",
                  "--junit", tmp_path / "bad.xml")
    assert bad.returncode == 1, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[-2].startswith("FAIL baseline_quality:") and lines[-1].startswith("Error: gate failed: baseline_quality")
    suite = ET.parse(tmp_path / "bad.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and int(suite.get("tests")) >= 3
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["baseline_quality"]
    assert ET.parse(tmp_path / "ok.xml").getroot().find("testsuite").get("failures") == "0"
    assert ET.parse(runs["base"] / "int8.xml").getroot().find("testsuite").get("failures") == "0"


def test_run_with_a_baseline_fails_exit_1_and_records_the_gate(runs, tiny_llama, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n")
    # random tiny weights predict uniformly, pruned or not: 1.5x better than the baseline report is out of reach
    p = run_cli("run", runs["base"] / "mag90.yaml", "--model", tiny_llama, "--out", tmp_path / "o", "--inline",
                "--baseline", runs["int8"], "--min-quality", "1.5", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert p.returncode == 1, p.stderr
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["passed"] is False and any(g["name"] == "baseline_quality" and g["passed"] is False for g in rep["gates"])
    text = summary.read_text()
    assert text.startswith("previous step\n") and "# slimctl: FAILED" in text


def test_limits_need_a_baseline_and_bad_presets_are_usage_errors(runs):
    p = run_cli("gate", runs["int8"], "--preset", "mlperf-99")
    assert p.returncode == 2 and "give one" in p.stderr
    p = run_cli("gate", runs["int8"], "--baseline", runs["int8"], "--preset", "mlperf-95")
    assert p.returncode == 2 and "--preset must be one of" in p.stderr
    p = run_cli("gate", runs["base"] / "int8.yaml")
    assert p.returncode == 2 and "is not a slimctl report" in p.stderr


def test_latency_regression_inside_the_spread_is_noise():
    def rep(p50, rounds):
        return typed_report(bench=bench_result(p50, rounds_p50_ms=rounds))
    row = gates.against_baseline(rep(120, [100, 140]), rep(100, [95, 105]), max_latency_increase_pct=5)[0]
    assert row.passed is True and row.within_noise
    row = gates.against_baseline(rep(150, [145, 155]), rep(100, [95, 105]), max_latency_increase_pct=5)[0]
    assert row.passed is False and not row.within_noise and row.value == pytest.approx(50)


def test_pareto_marks_only_undominated_points():
    pts = [Point(latency=10, value=0.9), Point(latency=5, value=0.8), Point(latency=12, value=0.85), Point(latency=5, value=0.7)]
    assert pareto(pts) == [True, True, False, False]
    ppl = [Point(latency=10, value=20.0, higher=False), Point(latency=8, value=25.0, higher=False),
           Point(latency=9, value=30.0, higher=False)]
    assert pareto(ppl) == [True, True, False]


def test_compare_prints_one_table_with_pareto_marks(runs, tmp_path):
    p = run_cli("compare", runs["int8"], runs["mag90"], "--json", "--html", tmp_path / "c.html")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["runs"]
    assert [r["name"] for r in rows] == ["baseline", "int8", "mag90"]
    pts = [Point(latency=r["latency_p50_ms"], value=r["value"], higher=False) for r in rows]  # perplexity
    assert [r["pareto"] for r in rows] == pareto(pts) and any(r["pareto"] for r in rows)
    assert "slimctl comparison" in (tmp_path / "c.html").read_text()


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("SLIMCTL_SKIP_BROWSER") == "1":
            pytest.skip("SLIMCTL_SKIP_BROWSER=1")
        pytest.fail("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    return exe


def test_html_report_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    page = runs["base"] / "int8.html"
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "<script" not in text  # self-contained
    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1400"]
    shot = tmp_path / "shot.png"
    subprocess.run([exe, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # not a blank page
    assert any(c[1][2] > 200 and c[1][0] < 80 for c in colours)  # the blue of the slimmed points is drawn
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    rep = json.loads((runs["int8"] / "report.json").read_text())
    assert "PASSED" in dom and "Accuracy against latency" in dom
    assert f"{rep['delta']['fidelity']:.4g}" in dom and f"{rep['slimmed']['bench']['size_mb']:.4g}" in dom
