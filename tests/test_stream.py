"""--stream: a model slimmed one block at a time from its safetensors shards gives the same artifact,
bit for bit, as the in-memory path; the sharded artifact reloads with plain transformers; streamed
perplexity equals the in-memory one; memory is recorded; what cannot stream is refused clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, saved_tensors as _tensors
from slimctl.machine import torch_threads

# Every technique registered with streams=True is checked (a new one is picked up from the registry); these are
# the options that make each quick, beyond the small calibration every calibrated one gets.
OPTIONS = {
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 4, "group_size": 32},
    "awq": {"bits": 4, "group_size": 32, "search_samples": 4},
    "magnitude": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5},
    "sparsegpt": {"pattern": "2:4"},
    "structured": {"ffn": 0.25, "heads": 0.5},
    "mixed": {"avg_bits": 5.5, "group_size": 32, "sensitivity_samples": 2, "sensitivity_seq_len": 64},
}


def _streaming() -> list[str]:
    from slimctl.techniques import load_all

    return sorted(n for n, t in load_all().items() if t.streams)


def _options(method: str) -> dict:
    from slimctl.techniques import get

    small = {"calib_samples": 6, "calib_seq_len": 64} if "calib_samples" in get(method).config.model_fields else {}
    return {**small, **OPTIONS.get(method, {})}


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny untied Llama (GQA) written as several safetensors shards + index, as big checkpoints are."""
    from conftest import _tokenizer, tiny_llama_model

    tok = _tokenizer()
    path = tmp_path_factory.mktemp("sharded") / "llama"
    tiny_llama_model(tok, seed=1, num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(path, max_shard_size="1MB")
    tok.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


def _recipe(method: str, stream: bool, evaluate: bool = False, **options):
    from slimctl.recipe import from_dict

    return from_dict({"version": 1, "seed": 0, "stream": stream, "steps": [{"method": method, **_options(method), **options}],
                      "eval": {"skip": not evaluate, "max_samples": 4, "seq_len": 64, "max_tokens": 256},
                      "bench": {"skip": True}}, "test")


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("method", _streaming())
def test_streamed_artifact_is_bit_identical(sharded_llama, tmp_path, method, one_thread):
    from slimctl.workflow import pipeline

    mem = pipeline.run(_recipe(method, False), str(sharded_llama), tmp_path / "mem", isolate=False)
    st = pipeline.run(_recipe(method, True), str(sharded_llama), tmp_path / "stream", isolate=False)
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "stream" / "model")
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert st["memory"]["streamed"] and st["memory"]["peak_rss_mb"] > 0 and st["memory"]["blocks"] == 3
    assert st["artifact"]["reload_check"]["max_abs_diff"] <= 1e-5, st["artifact"]["reload_check"]
    assert st["passed"]
    assert st["slimmed"]["steps"][0]["layers"] == mem["slimmed"]["steps"][0]["layers"]


def test_streamed_query_head_pruning_is_bit_identical(sharded_llama, tmp_path, one_thread):
    """Query heads within each GQA group: the streamed model's attention modules get their new group size."""
    from slimctl.workflow import pipeline

    opts = {"ffn": 0.25, "heads": 0.0, "query_heads": 0.5}
    mem = pipeline.run(_recipe("structured", False, **opts), str(sharded_llama), tmp_path / "mem", isolate=False)
    st = pipeline.run(_recipe("structured", True, **opts), str(sharded_llama), tmp_path / "stream", isolate=False)
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "stream" / "model")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.self_attn.q_proj.weight"].shape[0] == a["model.layers.0.self_attn.k_proj.weight"].shape[0]
    assert st["artifact"]["reload_check"]["max_abs_diff"] <= 1e-5 and st["passed"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_tied_embeddings_model_is_bit_identical(tiny_llama, tmp_path, method, one_thread):
    """A tied LM head (one tensor under two names) streams, and the artifact stores it once, as in memory."""
    from slimctl.workflow import pipeline

    pipeline.run(_recipe(method, False), str(tiny_llama), tmp_path / "mem", isolate=False)
    pipeline.run(_recipe(method, True), str(tiny_llama), tmp_path / "stream", isolate=False)
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "stream" / "model")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_activations_on_disk_give_the_same_artifact(sharded_llama, tmp_path, one_thread, monkeypatch):
    """When a streamed model's calibration activations would not fit they go to disk, one file per batch:
    the result is the same bit for bit, and the folder is gone afterwards."""
    import tempfile

    import slimctl.techniques.calibrate as calibrate
    from slimctl.workflow import pipeline

    made = []
    real = calibrate.Activations.__init__

    def spy(self, on_disk=False, device=None):
        real(self, on_disk, device)
        made.append(self.folder)

    monkeypatch.setattr(calibrate, "ACTIVATIONS_SHARE", 0.0)  # any activations are "too large"
    monkeypatch.setattr(calibrate.Activations, "__init__", spy)
    pipeline.run(_recipe("gptq", False), str(sharded_llama), tmp_path / "mem", isolate=False)
    pipeline.run(_recipe("gptq", True), str(sharded_llama), tmp_path / "disk", isolate=False)
    assert made[0] is None and made[-1] is not None and not Path(made[-1]).exists()
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "disk" / "model")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(Path(tempfile.gettempdir()).glob("slimctl-activations-*"))


def test_streamed_eval_and_plain_transformers_reload(sharded_llama, tmp_path, one_thread, monkeypatch):
    """Sharded output (several shards + index) reloads with plain transformers; streamed perplexity
    equals the in-memory path's; the baseline comes from the cache the second time."""
    from transformers import AutoModelForCausalLM

    import slimctl.formats.sharded as sharded
    from slimctl.workflow import pipeline

    monkeypatch.setattr(sharded, "DEFAULT_SHARD_BYTES", 200_000)  # several shards even for a tiny model
    st = pipeline.run(_recipe("magnitude", True, evaluate=True), str(sharded_llama), tmp_path / "s", isolate=False)
    mem = pipeline.run(_recipe("magnitude", False, evaluate=True), str(sharded_llama), tmp_path / "m", isolate=False)
    art = tmp_path / "s" / "model"
    index = json.loads((art / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((art / f).exists() for f in set(index["weight_map"].values()))
    for side in ("baseline", "slimmed"):
        a = st[side]["eval"]["metrics"]["perplexity"]
        b = mem[side]["eval"]["metrics"]["perplexity"]
        assert a == pytest.approx(b, rel=1e-6), (side, a, b)
    assert st["delta"]["quality"]["kl_divergence"] == pytest.approx(mem["delta"]["quality"]["kl_divergence"], rel=1e-4, abs=1e-9) \
        if "quality" in st["delta"] else True
    plain = AutoModelForCausalLM.from_pretrained(art).eval()
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model").eval()
    ids = torch.tensor([[5, 9, 200, 7, 31]])
    with torch.inference_mode():
        assert torch.equal(plain(ids).logits, src(ids).logits)
    again = pipeline.run(_recipe("magnitude", True, evaluate=True), str(sharded_llama), tmp_path / "s2", isolate=False)
    assert again["baseline"]["eval"]["streamed"]["baseline_cached"] is True
    assert again["baseline"]["eval"]["metrics"]["perplexity"] == st["baseline"]["eval"]["metrics"]["perplexity"]


def test_gptq_artifact_loads_in_slimctl_and_matches_streamed_forward(sharded_llama, tmp_path, one_thread):
    from slimctl.workflow import pipeline
    from slimctl.evaluate.streamed import forward_logits
    from slimctl.models import load
    from slimctl.formats.streamed import open_streamed, read_meta

    pipeline.run(_recipe("gptq", True), str(sharded_llama), tmp_path / "g", isolate=False)
    art = tmp_path / "g" / "model"
    whole = load(str(art)).model
    streamed, st = open_streamed(art, "causal-lm", read_meta(art))
    ids = {"input_ids": torch.tensor([[5, 9, 200, 7, 31, 8]])}
    try:
        with torch.inference_mode():
            a = whole(**ids).logits
        b = forward_logits(streamed, [ids])[0]
    finally:
        st.close()
    assert (a - b).abs().max().item() <= 1e-4


def test_stream_refusals(sharded_llama, tmp_path):
    r = run_cli("quantize", sharded_llama, "--method", "int8-dynamic", "--stream", "--out", tmp_path / "a", "--skip-bench")
    assert r.returncode == 2 and r.stderr.strip().startswith("Error:") and "cannot run streamed" in r.stderr
    r = run_cli("prune", sharded_llama, "--method", "magnitude", "--sparsity", "0.5", "--scope", "global", "--stream",
                "--out", tmp_path / "b", "--skip-bench", "--skip-eval")
    assert r.returncode == 2 and "needs every weight in memory" in r.stderr, r.stderr
    assert not (tmp_path / "b" / "model").exists()
    r = run_cli("quantize", sharded_llama, "--method", "rtn", "--stream", "--stream-auto", "--out", tmp_path / "c")
    assert r.returncode == 2 and "exclusive" in r.stderr


def _spills() -> set:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("slimctl-spill-*"))


def test_streamed_runs_leave_no_spill_folder(sharded_llama, tmp_path):
    from slimctl.workflow import pipeline
    from slimctl.errors import UnsupportedError

    before = _spills()
    pipeline.run(_recipe("wanda", True), str(sharded_llama), tmp_path / "w", isolate=False)
    from slimctl.recipe import from_dict

    global_scope = from_dict({"version": 1, "stream": True, "bench": {"skip": True}, "eval": {"skip": True},
                              "steps": [{"method": "magnitude", "sparsity": 0.5, "scope": "global"}]}, "test")
    with pytest.raises(UnsupportedError):
        pipeline.run(global_scope, str(sharded_llama), tmp_path / "g", isolate=False)
    assert _spills() == before


def test_stream_refuses_nan_weights(sharded_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(sharded_llama, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    f = bad / index["weight_map"][name]
    state = load_file(f)
    state[name][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    r = run_cli("quantize", bad, "--method", "rtn", "--stream", "--out", tmp_path / "o", "--skip-bench", "--skip-eval")
    assert r.returncode == 2 and "model.layers.1.mlp.up_proj.weight holds NaN" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "model").exists()


def test_cli_stream_auto_stays_in_memory_for_a_small_model(sharded_llama, tmp_path):
    r = run_cli("quantize", sharded_llama, "--method", "rtn", "--stream-auto", "--out", tmp_path / "o", "--skip-bench",
                "--skip-eval", "--json")
    assert r.returncode == 0, r.stderr
    assert "memory" not in json.loads(r.stdout)


def test_streamed_awq_then_gptq_is_bit_identical(sharded_llama, tmp_path, one_thread):
    """Two calibrated steps streamed one after the other (AWQ's scales and clipping left in float, then GPTQ)
    give the in-memory artifact bit for bit."""
    from slimctl.workflow import pipeline
    from slimctl.recipe import from_dict

    calib = {"group_size": 32, "calib_samples": 6, "calib_seq_len": 64}

    def recipe(stream: bool):
        return from_dict({"version": 1, "seed": 0, "stream": stream, "steps": [
            {"method": "awq", **calib, "search_samples": 4}, {"method": "gptq", **calib}],
            "eval": {"skip": True}, "bench": {"skip": True}}, "test")

    pipeline.run(recipe(False), str(sharded_llama), tmp_path / "mem", isolate=False)
    st = pipeline.run(recipe(True), str(sharded_llama), tmp_path / "stream", isolate=False)
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "stream" / "model")
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert st["memory"]["streamed"] and [s["method"] for s in st["slimmed"]["steps"]] == ["awq", "gptq"]


def test_streamed_mixed_allocates_as_in_memory_and_refuses_measured_costs(sharded_llama, tmp_path, one_thread):
    """mixed's Fisher costs come from backward passes one block at a time, streamed or not: the same costs and the
    same mix of formats; the measured costs (a whole-model forward per Linear) are refused when streamed."""
    from slimctl.errors import UnsupportedError
    from slimctl.recipe import from_dict
    from slimctl.workflow import pipeline

    mem = pipeline.run(_recipe("mixed", False), str(sharded_llama), tmp_path / "mem", isolate=False)
    st = pipeline.run(_recipe("mixed", True), str(sharded_llama), tmp_path / "stream", isolate=False)
    a, b = mem["slimmed"]["steps"][0], st["slimmed"]["steps"][0]
    assert a["sensitivity"] == b["sensitivity"] and a["allocation"] == b["allocation"]
    assert len(set(a["allocation"].values())) == 2, a["allocation_counts"]  # int4 and int8 both chosen
    measured = from_dict({"version": 1, "stream": True, "bench": {"skip": True}, "eval": {"skip": True},
                          "steps": [{"method": "mixed", "sensitivity": "measured", "sensitivity_samples": 1,
                                     "calib_samples": 2, "calib_seq_len": 32}]}, "test")
    with pytest.raises(UnsupportedError, match="measured sensitivity"):
        pipeline.run(measured, str(sharded_llama), tmp_path / "m", isolate=False)


@pytest.mark.parametrize("rounds", [1, 2])
def test_streamed_global_structured_pruning_is_bit_identical_and_reloads(sharded_llama, tmp_path, one_thread, rounds):
    """Per-layer FFN widths (allocation global: the loss's Fisher at each block output from backward passes one
    block at a time, then the refit towards the unpruned model's outputs; in one or two rounds) give the
    in-memory artifact bit for bit; the streamed reload check and slimctl's loader read the per-layer shapes."""
    from slimctl.models import load
    from slimctl.recipe import from_dict
    from slimctl.workflow import pipeline

    def recipe(stream: bool):
        return from_dict({"version": 1, "seed": 0, "stream": stream, "steps": [
            {"method": "structured", "ffn": 0.4, "allocation": "global", "multiple_of": 8, "rounds": rounds,
             "calib_samples": 6, "calib_seq_len": 64}], "eval": {"skip": True}, "bench": {"skip": True}}, "test")

    mem = pipeline.run(recipe(False), str(sharded_llama), tmp_path / "mem", isolate=False)
    st = pipeline.run(recipe(True), str(sharded_llama), tmp_path / "stream", isolate=False)
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "stream" / "model")
    assert sorted(a) == sorted(b) and not [k for k in a if not torch.equal(a[k], b[k])]
    widths = st["slimmed"]["steps"][0]["ffn_widths"]
    assert widths == mem["slimmed"]["steps"][0]["ffn_widths"] and len(set(widths)) > 1, widths
    assert st["artifact"]["reload_check"]["max_abs_diff"] <= 1e-5 and st["passed"]
    m = load(str(tmp_path / "stream" / "model")).model
    assert [layer.mlp.down_proj.in_features for layer in m.model.layers] == widths
