"""`slimctl bench` beyond one point: sweeps with a recommendation, the out-of-memory back-off,
repeats and their spread, roofline fractions, cost, and config-only models nobody downloaded."""
import json

import pytest

from conftest import bench_result, run_cli

from slimctl.bench import catalogue, cost as C, study, sweep as S
from slimctl.recipe import BenchSpec
from slimctl.results.report import BenchResult
from slimctl.results.study import BenchStudy, Cost, SemiStructured

FAST = ["--min-iters", "2", "--min-seconds", "0", "--seq-len", "16", "--decode-tokens", "2"]


def _fake(latency_of_batch, memory_of_batch=lambda b: 100.0):
    def measure(spec: BenchSpec):
        b = spec.batch_size
        lat = latency_of_batch(b)
        if lat is None:
            from slimctl.errors import SlimctlError
            raise SlimctlError("out of memory while benchmarking")
        return BenchResult.model_validate({"device": "cpu", "seq_len": 16, "latency_ms": {"p50": lat}, "latency_of": "forward", "phases": {"forward": {"latency_ms": {"p50": lat, "p95": lat * 1.1}}},
                "throughput": {"samples_per_s": b / lat * 1000, "tokens_per_s": 16 * b / lat * 1000},
                "peak_memory_mb": memory_of_batch(b), "dtype": "float32", "batch_size": b})
    return measure


def test_auto_grows_until_throughput_flattens_and_recommends_the_knee():
    rows = S.sweep(_fake(lambda b: 10 * max(b, 8)), BenchSpec(), "auto", None, None)  # throughput flat from batch 8
    assert [r.batch_size for r in rows] == [1, 2, 4, 8, 16, 32]
    rec = S.recommend(rows, None)
    assert rec.batch_size == 8 and "knee" in rec.reason


def test_auto_bisects_after_running_out_of_memory():
    rows = S.sweep(_fake(lambda b: None if b > 20 else 10.0), BenchSpec(), "auto", None, None)
    ok = [r.batch_size for r in rows if r.status == "ok"]
    oom = [r.batch_size for r in rows if r.status == "out of memory"]
    assert ok == [1, 2, 4, 8, 16, 20] and oom == [24, 32]  # 32 failed; bisection found 20 fits and 24 does not


def test_max_memory_cap_marks_points_out_of_memory_and_stops():
    rows = S.sweep(_fake(lambda b: 10.0, lambda b: 100.0 * b), BenchSpec(), [1, 2, 4, 8], None, 250)
    assert [r.status for r in rows] == ["ok", "ok", "out of memory"]
    assert rows[-1].error == "peak 400 MB exceeds --max-memory 250 MB"


def test_slo_recommendation_and_its_failure_are_stated():
    rows = S.sweep(_fake(lambda b: 5.0 + 2.5 * b), BenchSpec(), [1, 2, 4], None, None)
    assert S.recommend(rows, 12.0).batch_size == 2  # p95 = 1.1 x 10 ms meets 12 ms; batch 4's 16.5 ms does not
    miss = S.recommend(rows, 1.0)
    assert miss.batch_size is None and "lowest p95 is 8.2 ms at batch 1" in miss.reason


def test_cost_per_million_tokens_follows_throughput():
    c = C.cost(bench_result(throughput={"tokens_per_s": 100.0, "samples_per_s": 1.0}, decode_tokens_per_s=120.0),
               True, "cpu", 3.6)
    assert c.usd_per_1m_tokens == pytest.approx(3.6 / 3600 / 100 * 1e6) and c.per_1m[1] == "tokens"
    c = C.cost(bench_result(throughput={"samples_per_s": 2.0}, batch_size=8), False, "cpu", None)
    assert "EXAMPLE" in c.assumption and c.usd_per_1m_samples == pytest.approx(0.10 / 3600 / 2 * 1e6)


def _headline(p95: float, usd: float, example: bool = False) -> BenchStudy:
    return BenchStudy(model="m", kind="causal-lm", device="cpu", isolated=True,
                      bench=bench_result(latency_ms={"p50": p95 / 2, "p95": p95}),
                      cost=Cost(usd_per_1m_tokens=usd, hourly_usd=1.0, basis="b",
                                assumption="EXAMPLE price" if example else "1 USD/h"))


def test_placement_picks_the_cheapest_device_that_meets_the_slo():
    cpu, gpu = _headline(900.0, 0.50), _headline(40.0, 0.80)
    p = C.placement({"cpu": cpu, "cuda": gpu}, 1000.0)
    assert p.choice == "cpu" and p.devices["cpu"].meets_slo and "place it on cpu" in p.line
    p = C.placement({"cpu": cpu, "cuda": gpu}, 100.0)  # the CPU misses: the GPU, though dearer per token
    assert p.choice == "cuda" and "misses the SLO" in p.line
    p = C.placement({"cpu": cpu, "cuda": gpu}, 10.0)
    assert p.choice is None and "no device meets" in p.line
    p = C.placement({"cpu": cpu, "cuda": _headline(40.0, 0.20, example=True)}, None)
    assert p.choice == "cuda" and "EXAMPLE price" in p.line and "no --slo-p95-ms" in p.line


def test_semi_structured_without_a_gain_is_warned():
    out = BenchStudy(model="m", kind="causal-lm", device="cuda", isolated=True,
                     semi_structured=SemiStructured(speedup=0.1, sparse_p50_ms=138.0, dense_p50_ms=13.8))
    assert any("no measured gain" in w for w in study._warnings(out, [None]))
    out.semi_structured.speedup = 1.3
    assert not any("2:4" in w for w in study._warnings(out, [None]))


def test_hourly_cost_takes_one_price_or_one_per_device():
    assert C.parse_hourly("0.5", ["cpu", "cuda"]) == {"cpu": 0.5, "cuda": 0.5}
    assert C.parse_hourly("cpu=0.68,cuda=3.5", ["cpu", "cuda"]) == {"cpu": 0.68, "cuda": 3.5}
    assert C.parse_hourly("cuda=3.5", ["cpu", "cuda"]) == {"cpu": None, "cuda": 3.5}
    assert C.parse_hourly(None, ["cpu"]) == {"cpu": None}
    from slimctl.errors import UsageError
    for bad in ("cheap", "tpu=1", "cpu=-1"):
        with pytest.raises(UsageError):
            C.parse_hourly(bad, ["cpu", "cuda"])


def test_bench_sweep_cli_on_a_real_model(tiny_bert):
    p = run_cli("bench", tiny_bert, "--batch-sizes", "auto", "--json", *FAST)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert len([s for s in r["sweep"] if s["status"] == "ok"]) >= 3
    assert r["recommendation"]["batch_size"] in [s["batch_size"] for s in r["sweep"]] and r["recommendation"]["reason"]
    assert r["bench"]["roofline"]["forward_pct_of_compute_floor"] > 0
    assert r["cost"]["usd_per_1m_samples"] > 0


def test_single_point_reports_rounds_spread_roofline_and_cost(tiny_llama):
    p = run_cli("bench", tiny_llama, "--repeats", "2", "--hourly-cost", "1.5", "--json", *FAST)
    assert p.returncode == 0, p.stderr
    b = json.loads(p.stdout)
    lo, hi = b["bench"]["spread_p50_ms"]
    assert len(b["bench"]["rounds_p50_ms"]) == 2 and lo <= hi
    rf = b["bench"]["roofline"]
    assert rf["decode_pct_of_bandwidth_floor"] > 0 and rf["prefill_pct_of_compute_floor"] > 0
    assert b["cost"]["hourly_usd"] == 1.5 and b["cost"]["usd_per_1m_tokens"] > 0


def test_config_only_bench_builds_random_weights_of_that_shape(tmp_path):
    cfg = dict(catalogue.ARCHITECTURES["llama-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = run_cli("bench", "--config", tmp_path / "config.json", "--dtypes", "fp32,bf16", "--batch-sizes", "1,2", "--json", *FAST)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {s["dtype"] for s in r["sweep"]} == {"float32", "bfloat16"} and all(s["status"] == "ok" for s in r["sweep"])
    assert 0 < r["config_only"]["parameters"] < 1e6


def test_config_only_slimmed_variant_is_measured_against_its_baseline(tmp_path):
    from conftest import REPO

    cfg = dict(catalogue.ARCHITECTURES["llama-1b"], hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = run_cli("bench", "--config", tmp_path / "config.json", "--recipe", REPO / "recipes" / "int4-rtn-g128.yaml",
                "--repeats", "1", "--json", *FAST)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    v = r["slimmed"]["vs_baseline"]
    assert r["slimmed"]["steps"][0]["method"] == "rtn" and r["slimmed"]["bench"]["decode_tokens_per_s"] > 0
    assert 0.2 < v["weights_ratio"] < 0.6  # int4 of the Linear layers; embeddings stay fp32
    b, s = r["bench"], r["slimmed"]["bench"]  # the ratio is of the two measurements shown beside it
    assert v["speedup"] == pytest.approx(b["latency_ms"]["p50"] / s["latency_ms"]["p50"])
    assert v["decode_speedup"] == pytest.approx(s["decode_tokens_per_s"] / b["decode_tokens_per_s"])
    p = run_cli("bench", "--config", tmp_path / "config.json", "--recipe", REPO / "recipes" / "int4-gptq-g128.yaml")
    assert p.returncode == 2 and "calibrates on text" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,msg", [
    (["--config", "llama-99b"], "neither a config.json nor a built-in architecture"),
    (["{m}", "--config", "llama-1b"], "not both or neither"),
    (["{m}", "--batch-sizes", "1,x"], "comma list of integers"),
    (["{m}", "--dtypes", "int3"], "--dtypes takes fp32, bf16, fp16"),
    (["{m}", "--hourly-cost", "lots"], "--hourly-cost takes USD per hour"),
    (["{m}", "--recipe", "recipes/bf16.yaml"], "--recipe measures a slimmed variant of a --config"),
])
def test_bench_option_errors(args, msg, tiny_bert):
    p = run_cli("bench", *[str(tiny_bert) if a == "{m}" else a for a in args])
    assert p.returncode == 2 and msg in p.stderr.strip().splitlines()[-1]
