"""The bad-input matrix: every command, every class of bad input, one documented outcome.

Each case must exit 2 with one `Error:` line that names the problem, print no traceback, leave every
input byte-identical (hashed before and after) and create no output.
"""
import json
import shutil

import pytest
import yaml

from conftest import run_cli, tree_digest


@pytest.fixture(scope="session")
def world(tiny_llama, tmp_path_factory):
    """Bad models, recipes and data files, built once."""
    w = tmp_path_factory.mktemp("world")
    good = w / "good"
    shutil.copytree(tiny_llama, good)

    def model(name, edit):
        d = w / name
        shutil.copytree(tiny_llama, d)
        edit(d)
        return d

    cfg = json.loads((tiny_llama / "config.json").read_text())
    (w / "empty").mkdir()
    model("config-only", lambda d: (d / "model.safetensors").unlink())
    model("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4096]))
    model("garbage-weights", lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 100))
    model("bad-json", lambda d: (d / "config.json").write_text("{oops"))
    model("no-model-type", lambda d: (d / "config.json").write_text(json.dumps({"hidden_size": 8})))
    model("pickle-only", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
    model("remote-code", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}})))
    model("enc-dec", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "is_encoder_decoder": True})))
    model("vision", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForImageClassification"]})))
    (w / "a-file").write_text("not a model")

    def poison(d):  # one NaN in one weight: a broken checkpoint
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    model("nan-weights", poison)

    def added_token(d):  # the tokenizer gained an EOS the embedding has no row for (no resize_token_embeddings)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
        tok.add_special_tokens({"eos_token": "[EOS]"})
        tok.save_pretrained(d)
    model("added-token", added_token)

    def recipe(name, doc):
        p = w / f"{name}.yaml"
        p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))

    base = {"version": 1, "steps": [{"method": "bf16"}], "eval": {"max_samples": 2, "seq_len": 32, "max_tokens": 64},
            "bench": {"min_iters": 1, "min_seconds": 0, "warmup": 0, "decode_tokens": 2, "seq_len": 8, "repeats": 1}}
    recipe("ok", base)
    recipe("malformed", "version: 1\nsteps: [\n")
    recipe("empty", "")
    recipe("list", "- 1\n- 2\n")
    recipe("unknown-key", {**base, "stepz": []})
    recipe("unknown-step-key", {**base, "steps": [{"method": "magnitude", "sparsity": 0.5, "sparsty": 1}]})
    recipe("awq-grid-mismatch", {**base, "steps": [{"method": "awq", "group_size": 64}, {"method": "gptq", "group_size": 32}]})
    recipe("wrong-type", {**base, "steps": [{"method": "magnitude", "sparsity": "half"}]})
    recipe("sparsity-1.5", {**base, "steps": [{"method": "magnitude", "sparsity": 1.5}]})
    recipe("bits-5", {**base, "steps": [{"method": "rtn", "bits": 5}]})
    recipe("rotate-after-int4", {**base, "steps": [{"method": "rtn", "bits": 4}, {"method": "rotate"}]})
    recipe("kv-compiled", {**base, "steps": [{"method": "rtn"}], "bench": {**base["bench"], "kv_cache": "int4", "compile": True}})
    recipe("group-100", {**base, "steps": [{"method": "rtn", "bits": 4, "group_size": 100}]})
    recipe("contradictory", {**base, "steps": [{"method": "rtn"}, {"method": "magnitude", "sparsity": 0.5}]})
    recipe("two-casts", {**base, "steps": [{"method": "bf16"}, {"method": "fp16"}]})
    recipe("version-2", {**base, "version": 2})
    recipe("no-steps", {"version": 1})
    recipe("unknown-method", {**base, "steps": [{"method": "awq-9000"}]})
    recipe("bad-data", {**base, "eval": {"data": str(w / "empty.jsonl")}})
    recipe("distill-first", {**base, "steps": [{"method": "distill"}]})
    recipe("distill-after-int4", {**base, "steps": [{"method": "depth", "blocks": 1}, {"method": "rtn"}, {"method": "distill"}]})
    recipe("two-heads", {**base, "steps": [{"method": "rtn"}, {"method": "lm_head"}, {"method": "lm_head", "bits": 4}]})
    recipe("absurd-batch", {**base, "bench": {"batch_size": 1_000_000}})
    (w / "recipe-dir").mkdir()

    (w / "empty.jsonl").write_text("")
    (w / "binary.jsonl").write_bytes(b"\x00\x01\x02" * 100)
    (w / "wrong-schema.jsonl").write_text('{"sentence": "no text field"}\n')
    (w / "not-json.jsonl").write_text("hello\n")
    (w / "data.csv").write_text("text\nhello\n")
    (w / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (w / "existing-out").mkdir()
    (w / "existing-out" / "keep.txt").write_text("mine")
    (w / "empty.txt").write_text("")
    (w / "short.txt").write_text("A line or two of text, far fewer tokens than one eval window.\n")
    (w / "task-unparsable.yaml").write_text("task: x\ndoc_to_text: [unclosed\n")
    (w / "task-no-data.yaml").write_text(yaml.safe_dump({"task": "t", "dataset_path": "json", "output_type": "multiple_choice",
                                                        "dataset_kwargs": {"data_files": {"test": "gone.jsonl"}}}))
    recipe("with-bad-task", {**base, "eval": {**base["eval"], "tasks": [str(w / "task-no-data.yaml")]}})
    (w / "garbage.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    (w / "garbage-report").mkdir()
    (w / "garbage-report" / "report.json").write_text("[1, 2]")
    return w


Q = ["quantize", "{good}", "--method", "rtn", "--skip-bench", "--skip-eval", "--out", "{out}"]
RUN = ["run", "{w}/ok.yaml", "--model", "{good}", "--out", "{out}", "--inline"]
CASES = [
    # models, through every command that loads one
    (["eval", "{w}/empty"], "has no config.json"),
    (["bench", "{w}/config-only"], "has a config but no *.safetensors weights"),
    (["quantize", "{w}/truncated", "--method", "rtn", "--out", "{out}", "--skip-bench"], "could not load weights"),
    (["prune", "{w}/garbage-weights", "--sparsity", "0.5", "--out", "{out}"], "could not load weights"),
    (["eval", "{w}/bad-json"], "is not valid JSON"),
    (["bench", "{w}/no-model-type"], "has no model_type"),
    (["run", "{w}/ok.yaml", "--model", "{w}/pickle-only", "--out", "{out}"], "holds only pickle weights"),
    (["eval", "{w}/remote-code"], "needs custom code"),
    (["eval", "{w}/enc-dec"], "encoder-decoder models"),
    (["bench", "{w}/vision"], "FooForImageClassification is not supported"),
    (["eval", "{w}/a-file"], "is a file"),
    (["eval", "{w}/missing-folder"], "does not exist"),
    (["eval", "smollm2-135"], "is not a built-in name or local folder"),
    (["bench", "no-such-org/no-such-model"], "HF_HUB_OFFLINE is set"),
    (["quantize", "{w}/nan-weights", "--method", "rtn", "--out", "{out}"],
     "has weights that are NaN or Inf: model.layers.0.mlp.up_proj.weight (1 of 8,192 values)"),
    (["eval", "{w}/nan-weights"], "the checkpoint is broken (or pass --allow-non-finite"),
    (["bench", "{w}/nan-weights"], "has weights that are NaN or Inf"),
    (["quantize", "{w}/nan-weights", "--method", "gptq", "--allow-non-finite", "--set", "calib_samples=2", "--skip-bench",
      "--skip-eval", "--out", "{out}"], "the calibration inputs of model.layers.0.mlp.down_proj hold NaN or Inf"),
    # recipes
    (["run", "{w}/malformed.yaml", "--model", "{good}", "--out", "{out}"], "is not valid YAML at line"),
    (["run", "{w}/empty.yaml", "--model", "{good}", "--out", "{out}"], "a recipe must be a YAML mapping"),
    (["run", "{w}/list.yaml", "--model", "{good}", "--out", "{out}"], "a recipe must be a YAML mapping"),
    (["run", "{w}/unknown-key.yaml", "--model", "{good}", "--out", "{out}"], "unknown key 'stepz'"),
    (["run", "{w}/unknown-step-key.yaml", "--model", "{good}", "--out", "{out}"], "unknown key 'sparsty' in steps[0]"),
    (["run", "{w}/wrong-type.yaml", "--model", "{good}", "--out", "{out}"], "steps[0].sparsity: Input should be a valid number"),
    (["run", "{w}/sparsity-1.5.yaml", "--model", "{good}", "--out", "{out}"], "steps[0].sparsity: Input should be less than 1"),
    (["run", "{w}/bits-5.yaml", "--model", "{good}", "--out", "{out}"], "steps[0].bits: Input should be 3, 4 or 8"),
    (["run", "{w}/rotate-after-int4.yaml", "--model", "{good}", "--out", "{out}"], "'rotate' comes after quantization"),
    (["run", "{w}/kv-compiled.yaml", "--model", "{good}", "--out", "{out}"], "runs on the eager decode only"),
    (["eval", "{good}", "--kv-cache", "q5_1"], "kv_cache must be fp, int8 or int4"),
    (["bench", "{good}", "--kv-type", "q4_1"], "kv_cache must be fp, int8 or int4"),
    (["run", "{w}/group-100.yaml", "--model", "{good}", "--out", "{out}"], "group_size must be a power of two"),
    (["run", "{w}/contradictory.yaml", "--model", "{good}", "--out", "{out}"], "'magnitude' comes after quantization"),
    (["run", "{w}/two-casts.yaml", "--model", "{good}", "--out", "{out}"], "at most one cast step"),
    (["run", "{w}/version-2.yaml", "--model", "{good}", "--out", "{out}"], "version: Input should be 1"),
    (["run", "{w}/no-steps.yaml", "--model", "{good}", "--out", "{out}"], "steps: Field required"),
    (["run", "{w}/unknown-method.yaml", "--model", "{good}", "--out", "{out}"], "unknown method 'awq-9000'"),
    (["run", "{w}/recipe-dir", "--model", "{good}", "--out", "{out}"], "is a folder"),
    (["run", "{w}/absurd-batch.yaml", "--model", "{good}", "--out", "{out}"], "bench.batch_size: Input should be less than or equal to 4096"),
    # data
    (["run", "{w}/bad-data.yaml", "--model", "{good}", "--out", "{out}"], "is empty"),
    (["eval", "{good}", "--data", "{w}/binary.jsonl"], "looks binary"),
    (["eval", "{good}", "--data", "{w}/wrong-schema.jsonl"], "needs a non-empty string field 'text'"),
    (["eval", "{good}", "--data", "{w}/not-json.jsonl"], "line 1 is not valid JSON"),
    (["eval", "{good}", "--data", "{w}/data.csv"], "must end in .txt or .jsonl"),
    (["eval", "{good}", "--data", "{w}/latin1.txt"], "is not UTF-8"),
    (["eval", "{good}", "--max-samples", "0"], "--max-samples: Input should be greater than 0"),
    (["eval", "{good}", "--data", "{w}/empty.txt"], "is empty"),
    (["eval", "{good}", "--data", "{w}/short.txt", "--seq-len", "64"], "fewer than one eval window (64 tokens)"),
    # fast paths
    (["bench", "{good}", "--compile", "maybe"], "--compile takes auto, true or false, not 'maybe'"),
    (["bench", "{good}", "--kernels", "fast"], "--kernels: Input should be 'auto' or 'off'"),
    (["eval", "{good}", "--kernels", "fast"], "--kernels takes auto or off, not 'fast'"),
    (["run", "{w}/ok.yaml", "--model", "{good}", "--out", "{out}", "--compile", "sometimes"], "--compile takes auto, true or false"),
    (["quantize", "{good}", "--method", "rtn", "--set", "embeddings=true", "--out", "{out}", "--skip-bench"],
     "tied to the LM head"),
    (["quantize", "{good}", "--method", "lm_head", "--bits", "3", "--out", "{out}", "--skip-bench"], "bits: Input should be 4 or 8"),
    (["run", "{w}/two-heads.yaml", "--model", "{good}", "--out", "{out}"], "at most one lm_head step"),
    # GGUF export and llama.cpp as a runtime
    (["export", "{w}/good", "--out", "{out}/m.gguf"], "supports BPE tokenizers; this one is WordPiece"),
    (["export", "{good}", "--format", "onnx", "--out", "{out}/m.gguf"], "unknown export format 'onnx'; known: gguf"),
    (["export", "{good}", "--float-type", "f8", "--out", "{out}/m.gguf"], "--float-type: Input should be 'f16', 'f32' or 'bf16'"),
    (["export", "{good}", "--out", "{w}/recipe-dir"], "is a folder; give the .gguf file to write"),
    (["export", "{w}/nan-weights", "--out", "{out}/m.gguf"], "has weights that are NaN or Inf"),
    (["eval", "{w}/garbage.gguf"], "could not read"),
    (["eval", "{good}", "--runtime", "llamacpp"], "--runtime llamacpp runs a .gguf file"),
    (["bench", "{w}/garbage.gguf", "--runtime", "torch"], "a .gguf file runs with llama.cpp"),
    (["bench", "{good}", "--runtime", "vllm"], "--runtime takes auto, torch or llamacpp"),
    # lm-eval tasks: checked before any slimming work
    (["eval", "{good}", "--task", "{w}/task-unparsable.yaml"], "could not be read"),
    (["eval", "{good}", "--task", "{w}/task-no-data.yaml"], "data file gone.jsonl does not exist"),
    (["eval", "{good}", "--task", "hellaswag"], "needs the dataset Rowan/hellaswag from the Hugging Face hub"),
    (["eval", "{good}", "--task", "no_such_task_anywhere"], "neither an lm-eval task name nor a task YAML"),
    (["run", "{w}/with-bad-task.yaml", "--model", "{good}", "--out", "{out}"], "data file gone.jsonl does not exist"),
    # outputs
    (["run", "{w}/ok.yaml", "--model", "{good}", "--out", "{w}/existing-out"], "exists and is not empty"),
    (["run", "{w}/ok.yaml", "--model", "{good}", "--out", "{w}/existing-out", "--overwrite"], "holds files slimctl did not write"),
    (["run", "{w}/ok.yaml", "--model", "{good}", "--out", "/proc/slimctl-out"], "cannot write to --out"),
    (["run", "{w}/ok.yaml", "--model", "{good}", "--out", "{w}/a-file"], "is a file; pass a folder"),
    # devices, sizes and options
    (["bench", "{good}", "--device", "cuda"], "no CUDA GPU"),
    (["bench", "{good}", "--device", "tpu"], "--device takes cpu, cuda or cpu,cuda"),
    (["bench", "{good}", "--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    (["bench", "{good}", "--batch-size", "100000"], "--batch-size: Input should be less than or equal to 4096"),
    (["bench", "{good}", "--seq-len", "1000", "--min-iters", "1", "--min-seconds", "0"], "exceeds the model's 512 positions"),
    (["prune", "{good}", "--sparsity", "0", "--out", "{out}"], "sparsity: Input should be greater than 0"),
    (["prune", "{good}", "--sparsity", "0.5", "--scope", "row", "--out", "{out}"], "scope: Input should be 'layer' or 'global'"),
    (["prune", "{good}", "--out", "{out}"], "give either sparsity (e.g. 0.5, unstructured) or pattern"),
    (["prune", "{good}", "--method", "wanda", "--pattern", "2-4", "--out", "{out}"], "pattern must be 'N:M'"),
    (["prune", "{good}", "--pattern", "2:4", "--scope", "global", "--out", "{out}"], "scope 'global' applies to unstructured"),
    (["prune", "{good}", "--method", "wanda", "--pattern", "3:48", "--out", "{out}"], "needs input widths divisible by 48"),
    (["prune", "{good}", "--method", "sparsegpt", "--pattern", "3:48", "--out", "{out}"], "block_size 128 must be a multiple of M=48"),
    (["prune", "{good}", "--method", "structured", "--out", "{out}"], "set ffn, heads and/or query_heads"),
    (["prune", "{good}", "--method", "structured", "--set", "heads=0.99", "--out", "{out}"], "would remove all 2 key/value heads"),
    (["prune", "{good}", "--method", "structured", "--set", "ffn=1.0", "--out", "{out}"], "ffn: Input should be less than 1"),
    (["prune", "{good}", "--method", "depth", "--set", "blocks=2", "--out", "{out}"], "at most 0 can go"),
    (["prune", "{good}", "--method", "depth", "--out", "{out}"], "set exactly one of blocks"),
    (["prune", "{good}", "--method", "slice", "--set", "fraction=1.0", "--out", "{out}"], "fraction: Input should be less than 1"),
    (["prune", "{good}", "--method", "slice", "--set", "fraction=0.01", "--out", "{out}"], "or a smaller multiple_of"),
    (["run", "{w}/distill-first.yaml", "--model", "{good}", "--out", "{out}"], "needs a teacher"),
    (["run", "{w}/distill-after-int4.yaml", "--model", "{good}", "--out", "{out}"], "comes after quantization"),
    (Q + ["--bits", "5"], "bits: Input should be 3, 4 or 8"),
    (Q + ["--bits", "4", "--group-size", "100"], "group_size must be a power of two"),
    (Q + ["--set", "nonsense"], "--set needs KEY=VALUE"),
    (Q + ["--set", "colour=blue"], "unknown key 'colour'"),
    (["quantize", "{good}", "--method", "magnitude", "--out", "{out}"], "is not a method of this command"),
    (["eval", "{good}", "--against", "{w}/empty"], "has no config.json"),
    (["verify", "{w}/empty"], "report.json does not exist"),
    (["verify", "{w}/garbage-report"], "is not a slimctl report"),
    (["eval", "{good}", "--no-such-flag"], "No such option"),
    (["eval", "{w}/added-token"], "but the model's embedding has 30522 rows"),
    # search: budget and candidate options are checked before any model work
    (["search", "{good}", "--max-drop", "lots", "--out", "{out}"], "--max-drop takes a fraction"),
    (["search", "{good}", "--max-drop", "1%", "--space", "bogus", "--out", "{out}"], "--space takes default or none"),
    (["search", "{good}", "--max-drop", "1%", "--space", "none", "--out", "{out}"], "--space none needs --candidates"),
    (["search", "{good}", "{w}/ok.yaml", "--max-drop", "1%", "--out", "{out}"], "unexpected argument(s) after the model"),
    (["search", "{good}", "--max-drop", "1%", "--candidates", "{w}/malformed.yaml", "--out", "{out}"], "is not valid YAML at line"),
    (["search", "{good}", "--max-drop", "1%", "--objective", "speed", "--out", "{out}"], "--objective: must be one of latency"),
    (["search", "{good}", "--max-drop", "1%", "--metric", "bleu", "--out", "{out}"], "--metric: must be one of ppl"),
    (["search", "{good}", "--max-drop", "1%", "--budget-minutes", "0", "--out", "{out}"], "--budget-minutes: Input should be greater than 0"),
    # search --engine ray: options checked before any work; a cluster that is not there is said so in a second
    (["search", "{good}", "--max-drop", "1%", "--engine", "spark", "--out", "{out}"], "--engine: Input should be 'local' or 'ray'"),
    (["search", "{good}", "--max-drop", "1%", "--task-cpus", "2", "--out", "{out}"], "--address and --task-cpus need --engine ray"),
    (["search", "{good}", "--max-drop", "1%", "--engine", "ray", "--address", "nowhere", "--out", "{out}"],
     "--address: takes auto, HOST:PORT or ray://HOST:PORT"),
    (["search", "{good}", "--max-drop", "1%", "--engine", "ray", "--address", "127.0.0.1:1", "--out", "{out}"],
     "cannot join the Ray cluster at 127.0.0.1:1"),
    # AWQ and mixed precision: the grid AWQ searches must be the one GPTQ rounds to; a budget below int4's bits
    (["run", "{w}/awq-grid-mismatch.yaml", "--model", "{good}", "--out", "{out}"], "awq's group_size 64 differs from the gptq step's 32"),
    (["quantize", "{good}", "--method", "mixed", "--avg-bits", "4.1", "--group-size", "32", "--out", "{out}", "--skip-bench"],
     "avg_bits 4.1 is below the smallest possible 5.000 bits per weight"),
    # --stream: what cannot stream says so before any work; a streamed broken checkpoint names its tensor
    (["quantize", "{good}", "--method", "int8-dynamic", "--stream", "--out", "{out}", "--skip-bench"], "int8-dynamic cannot run streamed"),
    (["prune", "{good}", "--method", "magnitude", "--sparsity", "0.5", "--scope", "global", "--stream", "--skip-eval",
      "--skip-bench", "--out", "{out}"], "scope: global (one threshold over every layer) needs every weight in memory"),
    (["quantize", "{good}", "--method", "rtn", "--stream", "--stream-auto", "--out", "{out}"], "--stream and --stream-auto are exclusive"),
    (["quantize", "{w}/nan-weights", "--method", "rtn", "--stream", "--skip-bench", "--skip-eval",
      "--out", "{out}"], "model.layers.0.mlp.up_proj.weight holds NaN or Inf"),
    (["quantize", "{w}/a-file", "--method", "rtn", "--stream", "--out", "{out}"], "is a file; pass the folder"),
    (["quantize", "{w}/pickle-only", "--method", "rtn", "--stream", "--allow-pickle", "--out", "{out}"], "--stream reads safetensors only"),
    (["quantize", "{good}", "--method", "rtn", "--stream", "--out", "{out}", "--skip-bench", "--set", "embeddings=true"],
     "embeddings: true needs every weight in memory"),
    (["quantize", "{w}/truncated", "--method", "rtn", "--stream", "--out", "{out}"], "is not a safetensors file"),
    # the commands that read reports
    (["gate", "{w}/missing-folder"], "missing-folder does not exist"),
    (["gate", "{w}/a-file", "--preset", "mlperf-99"], "compare with --baseline; give one"),
    (["report", "{w}/a-file", "--html", "{out}/r.html"], "is not a slimctl report (not JSON)"),
    (["compare", "{good}/config.json", "{w}/a-file"], "config.json is not a slimctl report (schema slimctl.report/v1 expected)"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[f"{i:02d}-{c[0][0]}-{c[1][:28]}" for i, c in enumerate(CASES)])
def test_bad_input(args, message, world, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(world)
    argv = [a.format(w=world, good=world / "good", out=out) for a in args]
    p = run_cli(*argv, env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    errors = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-1500:]
    assert "Traceback" not in p.stderr
    assert tree_digest(world) == before, "an input was modified"
    assert not out.exists() or not any(out.iterdir()), "partial output was left"


def test_every_command_that_reads_input_has_a_case():
    from slimctl.cli import app

    commands = {c.name for c in app.registered_commands} - {"models", "methods"}  # these two read no input
    assert commands <= {args[0] for args, _ in CASES}, commands - {args[0] for args, _ in CASES}
