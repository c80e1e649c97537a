"""Evaluation a user can trust on their own data: a .txt is one token stream, too few tokens is
flagged (and a perplexity gate on them fails), and lm-evaluation-harness tasks run offline on the
models in memory, with numbers checked against a direct loglikelihood computation."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from slimctl.results import gates
from slimctl.results.report import Delta
from slimctl import recipe as R
from slimctl.errors import DataError
from slimctl.evaluate import FEW_TOKENS, evaluate
from slimctl.evaluate import data as datasets
from slimctl.models import load

TOPICS = ["business", "entertainment", "politics", "sport", "technology"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load(str(tiny_llama))


def _long_text(n_articles=12) -> str:
    return "\n\n".join(a.text for a in datasets.bbc("calib")[:n_articles])


def test_txt_is_one_stream_and_matches_the_same_text_as_one_jsonl_document(llama, tmp_path):
    text = _long_text()
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text.strip()}) + "\n")
    spec = dict(seq_len=64, max_tokens=2048, max_samples=2)  # max_samples limits .jsonl documents, not a .txt
    a = evaluate(llama.model, llama.tokenizer, "causal-lm", R.EvalSpec(data=str(tmp_path / "a.txt"), **spec))
    b = evaluate(llama.model, llama.tokenizer, "causal-lm", R.EvalSpec(data=str(tmp_path / "a.jsonl"), **spec))
    assert a.settings["documents"] == 1 and a.settings["tokens_scored"] == 2047
    assert a.metrics["perplexity"] == pytest.approx(b.metrics["perplexity"], rel=1e-6)
    assert a.settings["tokens_scored"] == b.settings["tokens_scored"]
    # the paragraphs are still the examples for calibration and encoders
    assert len(datasets.read_file(tmp_path / "a.txt")) == text.count("\n\n") + 1 - sum(
        1 for p in text.split("\n\n") if not p.strip())


def test_few_tokens_warn_with_the_count_and_a_short_file_is_an_error(llama, tmp_path):
    (tmp_path / "a.txt").write_text(_long_text(3))
    ev = evaluate(llama.model, llama.tokenizer, "causal-lm", R.EvalSpec(data=str(tmp_path / "a.txt"), seq_len=64, max_tokens=500))
    n = ev.settings["tokens_scored"]
    assert n == 499 < FEW_TOKENS and len(ev.warnings) == 1
    assert f"only {n:,} tokens" in ev.warnings[0] and "--max-tokens" in ev.warnings[0]
    (tmp_path / "short.txt").write_text("Only a few words here.")
    with pytest.raises(DataError, match=r"gives \d+ tokens, fewer than one eval window \(64 tokens\)"):
        evaluate(llama.model, llama.tokenizer, "causal-lm", R.EvalSpec(data=str(tmp_path / "short.txt"), seq_len=64))


def test_a_perplexity_gate_on_too_few_tokens_fails_with_that_reason():
    delta = Delta(perplexity_increase_pct=0.5, tokens_scored=300)
    rows = gates.check(R.Gates(max_ppl_increase_pct=2).model_dump(), delta)
    assert rows[0].passed is False
    assert gates.failures(rows) == ["max_ppl_increase_pct: perplexity came from 300 scored tokens, fewer than min_eval_tokens "
                                    "1,024: too few to gate on (score more text, or lower gates.min_eval_tokens)"]
    rows = gates.check(R.Gates(max_ppl_increase_pct=2, min_eval_tokens=100).model_dump(), delta)
    assert rows[0].passed is True and not gates.failures(rows)
    assert gates.check({"min_eval_tokens": 1024}, delta) == []  # a setting, not a gate row


def test_run_fails_the_ppl_gate_on_a_tiny_eval(tiny_llama, tmp_path, fast_recipe):
    from conftest import run_cli

    r = fast_recipe([{"method": "bf16"}], gates={"max_ppl_increase_pct": 50})  # 255 tokens scored
    p = run_cli("run", r, "--model", tiny_llama, "--out", tmp_path / "o", "--json", "--skip-bench")
    assert p.returncode == 1
    rep = json.loads(p.stdout)
    assert "fewer than min_eval_tokens" in p.stderr.strip().splitlines()[-1]
    assert any("only 255 tokens" in w for w in rep["warnings"])


# --- lm-evaluation-harness -------------------------------------------------------------------------

def _topic_task(folder, per_topic=5, name="bbc_topic_test"):
    """A 5-way multiple-choice topic task over held-out BBC articles, with a relative data path."""
    arts = datasets.balanced(datasets.bbc("eval"), per_topic)
    idx = {t: i for i, t in enumerate(datasets.TOPICS)}
    rows = [{"text": " ".join(a.text.split()[:30]), "label": idx[a.label]} for a in arts]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Article: {{text}}\nTopic:",
           "doc_to_target": "label", "doc_to_choice": TOPICS,
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "task.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "task.yaml", rows


def _direct(model, tok, rows):
    """acc and acc_norm by hand: the loglikelihood of " choice" after the prompt, argmax over choices
    (acc_norm divides by the choice's length in characters), as lm-eval defines them."""
    acc = norm = 0
    for r in rows:
        ctx = f"Article: {r['text']}\nTopic:"
        lls = []
        for c in TOPICS:
            c_ids = tok.encode(ctx, add_special_tokens=False)
            whole = tok.encode(ctx + " " + c, add_special_tokens=False)
            cont = whole[len(c_ids):]
            ids = torch.tensor([whole])
            with torch.inference_mode():
                logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0, -len(cont):].float(), -1)
            lls.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        acc += max(range(5), key=lambda i: lls[i]) == r["label"]
        norm += max(range(5), key=lambda i: lls[i] / len(TOPICS[i])) == r["label"]
    return acc / len(rows), norm / len(rows)


def test_lm_eval_task_matches_a_direct_loglikelihood_computation(llama, tmp_path, monkeypatch):
    from slimctl.evaluate import tasks

    monkeypatch.chdir(tmp_path.parent)  # the task's data path is relative to the YAML, not to the working folder
    task, rows = _topic_task(tmp_path)
    ts = tasks.prepare([str(task)])
    assert ts.names == ["bbc_topic_test"]
    slim = R.EvalSpec(seq_len=64, max_tokens=256, tasks=[str(task)])
    ev = evaluate(llama.model, llama.tokenizer, "causal-lm", slim, reference=llama.model, taskset=ts)
    t = ev.extra["tasks"]["bbc_topic_test"]
    acc, acc_norm = _direct(llama.model, llama.tokenizer, rows)
    n = len(rows)
    assert t.samples == n == 25
    assert t.metrics["acc"] == pytest.approx(acc) and t.metrics["acc_norm"] == pytest.approx(acc_norm)
    assert t.metrics["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert t.reference_metrics == t.metrics and t.drop_pct == 0.0 and t.primary == "acc"


def test_task_drop_is_gateable_in_a_run(tiny_llama, tmp_path, fast_recipe):
    from conftest import run_cli

    task, _ = _topic_task(tmp_path, per_topic=2)
    r = fast_recipe([{"method": "magnitude", "sparsity": 0.9}], gates={"max_task_drop_pct": 0.0},
                    eval={"max_samples": 4, "seq_len": 64, "max_tokens": 256, "tasks": [str(task)]})
    p = run_cli("run", r, "--model", tiny_llama, "--out", tmp_path / "o", "--json", "--skip-bench")
    rep = json.loads(p.stdout)
    t = rep["slimmed"]["eval"]["tasks"]["bbc_topic_test"]
    assert t["samples"] == 10 and set(t["metrics"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert rep["delta"]["task_drop_pct"] == pytest.approx(t["drop_pct"])
    gate = next(g for g in rep["gates"] if g["name"] == "max_task_drop_pct")
    assert gate["passed"] is (t["drop_pct"] <= 0.0)
    assert p.returncode == (0 if gate["passed"] else 1), p.stderr

# Bad tasks (unparsable YAML, missing data file, a hub task offline, an unknown name) are cases of the
# bad-input matrix in test_bad_inputs.py: one Error: line each, exit 2, nothing written.


def test_a_task_template_failing_on_one_document_is_one_error_line_exit_2(tiny_llama, tmp_path):
    """doc_to_target maps a label through a list the data does not fit ('sports' is not in it): bad input,
    named with the task file, the template and the document, before any model is scored (was exit 3)."""
    from conftest import run_cli

    rows = [{"text": "Shares fell.", "topic": "business"}, {"text": "A late goal won it.", "topic": "sports"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"task": "topic_index", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{text}}\nTopic:",
           "doc_to_target": "{{ ['business', 'sport'].index(topic) }}", "doc_to_choice": ["business", "sport"],
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(cfg))
    p = run_cli("eval", tiny_llama, "--task", tmp_path / "task.yaml", "--max-samples", "2")
    assert p.returncode == 2, p.stderr[-800:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: task 'topic_index'") and "task.yaml" in last
    assert "doc_to_target" in last and "document 1" in last and "'sports' is not in list" in last
