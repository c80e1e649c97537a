"""Calibration on a device (`--device cuda`, the recipe's `device`; slimctl/techniques/placement.py), as far as a CPU
can check it: the move path (each block and its inputs moved to the device for its turn, the device made torch's
default, the block moved back) run with the CPU standing in for the GPU gives the same artifact bit for bit as the
plain path, in memory and streamed, for every block-sequential method including the backward passes (mixed's
Fisher, structured's global allocation); the recipe and the CLI route --device and --bench-device; a missing GPU is
one Error: line before any work. The same comparison on a real GPU is in tests/test_cuda.py."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from conftest import run_cli, saved_tensors as _tensors
from slimctl.machine import torch_threads

OPTIONS = {
    "gptq": {"bits": 4, "group_size": 32},
    "awq": {"bits": 4, "group_size": 32, "search_samples": 4},
    "mixed": {"avg_bits": 5.5, "group_size": 32, "sensitivity_samples": 2, "sensitivity_seq_len": 64},
    "structured": {"ffn": 0.25, "allocation": "global", "multiple_of": 8},
    "sparsegpt": {"pattern": "2:4"},
}


def _recipe(method: str, stream: bool = False, device: str = "cpu"):
    from slimctl.recipe import from_dict

    return from_dict({"version": 1, "seed": 0, "stream": stream, "device": device,
                      "steps": [{"method": method, "calib_samples": 6, "calib_seq_len": 64, **OPTIONS[method]}],
                      "eval": {"skip": True}, "bench": {"skip": True}}, "test")


@pytest.fixture
def cpu_as_device(monkeypatch):
    """One thread (so that sums repeat bit for bit); calibration takes placement's move path with the CPU as its device; counts the blocks moved."""
    from slimctl.techniques import placement

    moved = []
    real = placement.block_on_device

    @contextlib.contextmanager
    def forced(name="cpu"):
        token = placement._DEVICE.set(torch.device("cpu"))
        try:
            yield torch.device("cpu")
        finally:
            placement._DEVICE.reset(token)

    def counting(block):
        if placement.current() is not None:
            moved.append(block)
        return real(block)

    monkeypatch.setattr(placement, "calibration_device", forced)
    monkeypatch.setattr(placement, "block_on_device", counting)
    with torch_threads(1):
        yield moved


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory) -> Path:
    from conftest import _tokenizer, tiny_llama_model

    tok = _tokenizer()
    path = tmp_path_factory.mktemp("placement") / "llama"
    tiny_llama_model(tok, seed=2, num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(path, max_shard_size="1MB")
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_move_path_gives_the_same_artifact(untied_llama, tmp_path, method, cpu_as_device):
    from slimctl.techniques import placement
    from slimctl.workflow import pipeline

    plain_dir, moved_dir = tmp_path / "plain", tmp_path / "moved"
    with _plain(placement):
        pipeline.run(_recipe(method), str(untied_llama), plain_dir, isolate=False)
    assert not cpu_as_device
    pipeline.run(_recipe(method), str(untied_llama), moved_dir, isolate=False)
    assert len(cpu_as_device) >= 3  # every block took its turn on the "device"
    a, b = _tensors(plain_dir / "model"), _tensors(moved_dir / "model")
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@contextlib.contextmanager
def _plain(placement):
    """The plain path while the fixture's patch is in place: the device unset for the duration."""
    forced = placement.calibration_device
    placement.calibration_device = _unset
    try:
        yield
    finally:
        placement.calibration_device = forced


@contextlib.contextmanager
def _unset(name="cpu"):
    yield torch.device("cpu")


def test_move_path_streamed_with_activations_on_disk(untied_llama, tmp_path, cpu_as_device, monkeypatch):
    """Streamed, with the calibration activations written to disk and read back to the device: the same artifact
    as the plain in-memory path."""
    import slimctl.techniques.calibrate as calibrate
    from slimctl.techniques import placement
    from slimctl.workflow import pipeline

    with _plain(placement):
        pipeline.run(_recipe("gptq"), str(untied_llama), tmp_path / "plain", isolate=False)
    monkeypatch.setattr(calibrate, "ACTIVATIONS_SHARE", 0.0)
    pipeline.run(_recipe("gptq", stream=True), str(untied_llama), tmp_path / "disk", isolate=False)
    assert cpu_as_device
    a, b = _tensors(tmp_path / "plain" / "model"), _tensors(tmp_path / "disk" / "model")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_device_and_overrides():
    from slimctl.recipe import from_dict

    r = from_dict({"version": 1, "steps": [{"method": "gptq"}]}, "t")
    assert r.device == "cpu" and r.bench.device == "cpu"
    g = r.with_overrides(device="cuda")
    assert g.device == "cuda" and g.bench.device == "cuda"  # --device moves both
    g = r.with_overrides(device="cuda", bench_device="cpu")
    assert g.device == "cuda" and g.bench.device == "cpu"  # calibrate on the GPU, measure on the CPU
    assert from_dict({"version": 1, "device": "cuda", "steps": [{"method": "gptq"}]}, "t").device == "cuda"
    from slimctl.errors import RecipeError

    with pytest.raises(RecipeError):
        from_dict({"version": 1, "device": "tpu", "steps": [{"method": "gptq"}]}, "t")


def test_activations_read_back_to_their_device(tmp_path):
    from slimctl.techniques.calibrate import Activations

    acts = Activations(on_disk=True, device=torch.device("cpu"))
    item = ((torch.randn(1, 4, 8),), {"position_embeddings": (torch.ones(1, 4, 2), torch.zeros(1, 4, 2)), "flag": None})
    acts.append(item)
    (a,), k = acts[0]
    assert torch.equal(a, item[0][0]) and torch.equal(k["position_embeddings"][0], item[1]["position_embeddings"][0])
    assert k["flag"] is None
    acts.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("args, says", [
    (["quantize", "{m}", "--method", "gptq", "--device", "cuda"], "--device cuda was asked for (calibration on the GPU)"),
    (["quantize", "{m}", "--method", "gptq", "--bench-device", "cuda"], "--device cuda was asked for (the benchmark on the GPU)"),
    (["quantize", "{m}", "--method", "gptq", "--device", "tpu"], "--device takes cpu or cuda"),
    (["prune", "{m}", "--method", "structured", "--bench-device", "gpu"], "--bench-device takes cpu or cuda"),
])
def test_device_refusals_are_one_error_line_before_any_work(tiny_llama, tmp_path, args, says):
    out = tmp_path / "out"
    p = run_cli(*[a.replace("{m}", str(tiny_llama)) for a in args], "--out", str(out))
    assert p.returncode != 0 and p.returncode != 1, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], p.stderr
    assert not out.exists()  # nothing written, no folder left behind


def test_gpu_calibration_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_calib.py (what GPU_CHECK=calib runs on a lent GPU) on a tiny model, CPU only: each recipe runs
    from a tokenizer folder and a text file, and the JSON holds a row per recipe with its stages."""
    import json
    import subprocess
    import sys

    from conftest import REPO, _tokenizer

    tok = tmp_path / "tok"
    _tokenizer().save_pretrained(tok)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"the market report number {i} said prices rose while the team won again" * 4 for i in range(8)))
    out = tmp_path / "calib.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_calib.py"), "--out", str(out), "--tokenizer", str(tok),
                        "--data", str(data), "--quick", "--devices", "cpu"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["recipe"] for r in rows] == ["int4-gptq-g64", "int4-awq-gptq-g32"]
    assert all(r["seconds"] > 0 and r["steps"][0]["time_breakdown"] for r in rows)
    assert [s["method"] for s in rows[1]["steps"]] == ["awq", "gptq"]
