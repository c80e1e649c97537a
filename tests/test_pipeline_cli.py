"""The whole run and the CLI edge on tiny models: every shipped recipe, reloads, gates, errors, exit codes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_model, run_cli, tree_digest

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
REPORT_KEYS = {"schema", "model", "recipe", "environment", "baseline", "slimmed", "delta", "gates", "passed", "artifact"}


def _fast_copy(path: Path, tmp: Path) -> Path:
    """The shipped recipe with small eval/bench settings, so it runs in seconds on a tiny model."""
    doc = yaml.safe_load(path.read_text())
    doc["eval"] = {**doc.get("eval", {}), "max_samples": 4, "seq_len": 64, "max_tokens": 256}
    doc["bench"] = {**doc.get("bench", {}), "min_iters": 2, "min_seconds": 0, "warmup": 1, "decode_tokens": 4, "seq_len": 16, "batch_size": 2}
    doc["gates"] = {}
    for st in doc["steps"]:  # a distillation budget for a tiny model
        if st["method"] == "distill":
            st.update(tokens=512, seq_len=32, held_out=2)
        if st["method"] == "autoround":  # a few signed-gradient steps per block
            st.update(iters=10)
    p = tmp / path.name
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_on_a_tiny_model(recipe, tiny_llama, tmp_path):
    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.errors import UnsupportedError
    from slimctl.quant.fp8 import fp8_supported

    r = R.load(_fast_copy(recipe, tmp_path))
    if any(s.options().get("embeddings") for s in r.steps):  # int8 embeddings: refused for a table tied to the head
        with pytest.raises(UnsupportedError, match="tied to the LM head"):  # (run on an encoder in test_kernels.py)
            pipeline.run(r, str(tiny_llama), tmp_path / "out", isolate=False)
        assert not (tmp_path / "out").exists()
        return
    if any(s.method == "fp8" for s in r.steps) and not fp8_supported()[0]:
        import torch

        from slimctl.errors import DeviceError

        no_gpu = r.bench.device == "cuda" and not torch.cuda.is_available()  # refused before loading anything
        with pytest.raises(DeviceError if no_gpu else UnsupportedError,
                           match="the benchmark on the GPU" if no_gpu else "compute capability 8.9"):
            pipeline.run(r, str(tiny_llama), tmp_path / "out", isolate=False)
        assert not (tmp_path / "out").exists()  # refused: nothing written
        return
    rep = pipeline.run(r, str(tiny_llama), tmp_path / "out", isolate=False)
    assert REPORT_KEYS <= set(rep) and rep["schema"] == "slimctl.report/v1"
    for side in ("baseline", "slimmed"):
        b = rep[side]["bench"]
        assert {"p50", "p90", "p99"} <= set(b["latency_ms"]) and b["size_mb"] > 0 and b["peak_memory_mb"] > 0
        assert "perplexity" in rep[side]["eval"]["metrics"]
    assert rep["artifact"]["reload_check"]["max_abs_diff"] <= 1e-5
    names = {f["name"] for f in rep["artifact"]["files"]}
    weights = "model.onnx" if any(s.method == "onnx" for s in r.steps) else "model.safetensors"
    assert {"config.json", weights, "slimctl.json"} <= names
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"] is True
    assert (tmp_path / "out" / "report.md").read_text().startswith("# slimctl: PASSED")
    umask = os.umask(0)
    os.umask(umask)
    art = tmp_path / "out" / "model"
    assert art.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in art.iterdir())


_RELOAD = """
import sys, torch, json
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[2]))  # the test's threads: another count sums each matmul in another order
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
with torch.inference_mode():
    print(json.dumps(m(input_ids=ids).logits.float().flatten().tolist()))
"""


@pytest.mark.parametrize("steps", [[{"method": "bf16"}], [{"method": "magnitude", "sparsity": 0.5}]], ids=["bf16", "magnitude"])
def test_artifact_loads_in_plain_transformers_with_the_same_logits(steps, tiny_llama, tmp_path, fast_recipe):
    import torch

    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.models import load

    out = tmp_path / "out"
    pipeline.run(R.load(fast_recipe(steps)), str(tiny_llama), out, isolate=False)
    fresh = subprocess.run([sys.executable, "-c", _RELOAD, str(out / "model"), str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(fresh.stdout))
    ours = load(str(out / "model"))  # the same in-memory model slimctl evaluated passed the reload check
    with torch.inference_mode():
        mine = ours.model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).logits.float().flatten()
    assert torch.equal(theirs, mine)


def test_quantized_artifact_reloads_bitwise_with_slimctl(tiny_bert, tmp_path, fast_recipe):
    import torch

    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.models import load
    from slimctl.quant.layers import Int8Linear

    from slimctl.evaluate import evaluate

    recipe = R.load(fast_recipe([{"method": "int8-dynamic"}]))
    rep = pipeline.run(recipe, str(tiny_bert), tmp_path / "o", isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"] is True
    art = load(str(tmp_path / "o" / "model"))
    assert any(isinstance(x, Int8Linear) and x.qweight.dtype == torch.int8 for x in art.model.modules())
    base = load(str(tiny_bert))  # the report's accuracies are those of the two models, evaluated as the recipe says
    ev = evaluate(base.model, base.tokenizer, base.kind, recipe.eval, reference=None)
    assert rep["baseline"]["eval"]["metrics"]["topic_accuracy"] == ev.metrics["topic_accuracy"]


def test_gate_failure_exits_1_and_still_writes_the_report(tiny_llama, tmp_path, fast_recipe):
    r = fast_recipe([{"method": "magnitude", "sparsity": 0.9}], gates={"min_fidelity": 0.999999}, name="strict")
    p = run_cli("run", r, "--model", tiny_llama, "--out", tmp_path / "o", "--json", "--inline")
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert rep["passed"] is False and any(g["name"] == "min_fidelity" and g["passed"] is False for g in rep["gates"])
    assert p.stderr.strip().splitlines()[-1].startswith("Error: gate failed: min_fidelity")
    assert (tmp_path / "o" / "report.json").exists()


def test_run_json_passing_isolated(tiny_bert, tmp_path, fast_recipe):
    r = fast_recipe([{"method": "rtn"}], gates={"min_fidelity": 0.9, "max_ppl_increase_pct": 5})
    p = run_cli("run", r, "--model", tiny_bert, "--out", tmp_path / "o", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    b, s = rep["baseline"]["bench"], rep["slimmed"]["bench"]
    assert rep["passed"] and rep["delta"]["speedup"] == pytest.approx(b["latency_ms"]["p50"] / s["latency_ms"]["p50"])
    ppl_gate = next(g for g in rep["gates"] if g["name"] == "max_ppl_increase_pct")
    assert ppl_gate["passed"] is None and "not applicable" in ppl_gate["note"]
    v = run_cli("verify", tmp_path / "o")
    assert v.returncode == 0 and v.stdout.startswith("ok:")
    (tmp_path / "o" / "model" / "config.json").write_text("{}")
    v = run_cli("verify", tmp_path / "o")
    assert v.returncode == 1 and "config.json changed" in v.stderr


def test_help_has_an_example_for_every_command():
    from slimctl.cli import app
    import typer.main

    cmd = typer.main.get_command(app)
    for name in cmd.commands:
        p = run_cli(name, "--help")
        assert p.returncode == 0 and ("Example:" in p.stdout or "Examples:" in p.stdout), name


def _pickle_only(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _no_config(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "noconf")
    (d / "config.json").unlink()
    return d


def _truncated(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "trunc")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return d


def _bad_config(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "badconf")
    (d / "config.json").write_text("{not json")
    return d


def _remote_code(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "remote")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("maker, msg", [
    (_pickle_only, "holds only pickle weights"),
    (_no_config, "has no config.json"),
    (_truncated, "could not load weights"),
    (_bad_config, "is not valid JSON"),
    (_remote_code, "needs custom code"),
], ids=["pickle", "no-config", "truncated", "bad-config", "remote-code"])
def test_bad_model_folders_exit_2_with_one_line_and_leave_input_alone(maker, msg, tmp_path, tiny_llama):
    d = maker(tmp_path, tiny_llama)
    before = tree_digest(d)
    p = run_cli("quantize", d, "--method", "int8-dynamic", "--out", tmp_path / "o", "--skip-bench", "--skip-eval")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("Error:") and msg in lines[-1] and "Traceback" not in p.stderr
    assert tree_digest(d) == before
    assert not (tmp_path / "o" / "model").exists()


@pytest.mark.parametrize("args, msg", [
    (["eval", "no-such/model-anywhere"], "hub could not provide it"),
    (["eval", "./missing-folder"], "does not exist"),
    (["quantize", "{tiny}", "--method", "magnitude", "--out", "{tmp}/o"], "is not a method of this command"),
    (["quantize", "{tiny}", "--method", "gptq-9000", "--out", "{tmp}/o"], "unknown method 'gptq-9000'"),
    (["prune", "{tiny}", "--sparsity", "1.5", "--out", "{tmp}/o"], "sparsity: Input should be less than 1"),
    (["bench", "{tiny}", "--device", "cuda"], "no CUDA GPU"),
    (["bench", "{tiny}", "--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    (["run", "{tmp}/missing.yaml", "--model", "{tiny}", "--out", "{tmp}/o"], "does not exist"),
    (["eval", "{tiny}", "--data", "{tmp}/nothing.jsonl"], "does not exist"),
    (["verify", "{tmp}"], "report.json does not exist"),
    (["eval"], "Missing argument"),
], ids=lambda a: a if isinstance(a, str) else " ".join(a[:2]))
def test_bad_input_exits_2_with_one_error_line(args, msg, tmp_path, tiny_llama):
    args = [a.format(tiny=tiny_llama, tmp=tmp_path) for a in args]
    p = run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=60)  # bad input fails before any long work (scaled timeout)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert any(l.startswith("Error:") and msg in l for l in p.stderr.splitlines()), p.stderr
    assert "Traceback" not in p.stderr


def test_existing_output_is_refused_unless_overwrite(tiny_llama, tmp_path, fast_recipe):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = fast_recipe([{"method": "bf16"}])
    p = run_cli("run", r, "--model", tiny_llama, "--out", out, "--inline")
    assert p.returncode == 2 and "exists and is not empty" in p.stderr
    p = run_cli("run", r, "--model", tiny_llama, "--out", out, "--inline", "--overwrite")
    assert p.returncode == 2 and "did not write" in p.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert run_cli("run", r, "--model", tiny_llama, "--out", out, "--inline").returncode == 0
    assert run_cli("run", r, "--model", tiny_llama, "--out", out, "--inline").returncode == 2
    assert run_cli("run", r, "--model", tiny_llama, "--out", out, "--inline", "--overwrite").returncode == 0


def test_unwritable_output(tiny_llama, tmp_path, fast_recipe):
    import os

    if os.geteuid() == 0:
        target = Path("/proc/slimctl-out")  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "o"
    p = run_cli("run", fast_recipe([{"method": "bf16"}]), "--model", tiny_llama, "--out", target, "--inline")
    assert p.returncode == 2 and "Error: cannot write to --out" in p.stderr


def test_eval_and_bench_commands_json(tiny_llama, tiny_bert):
    p = run_cli("eval", tiny_llama, "--against", tiny_llama, "--max-samples", "2", "--seq-len", "32", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["vs_reference"]["top1_agreement"] == 1.0 and r["metrics"]["perplexity"] > 1
    p = run_cli("eval", tiny_llama, "--against", tiny_bert)
    assert p.returncode == 2 and "is a encoder model" in p.stderr
    p = run_cli("bench", tiny_bert, "--min-iters", "2", "--min-seconds", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bench"]["latency_of"] == "forward"


def test_models_and_methods_list(tmp_path):
    p = run_cli("models", "--json")
    names = {r["name"] for r in json.loads(p.stdout)}
    assert names == {"smollm2-135m", "minilm-l6", "gemma3-270m"}
    p = run_cli("methods", "--json")
    assert "int8-dynamic" in {r["name"] for r in json.loads(p.stdout)}
