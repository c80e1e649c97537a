"""Evaluation and measurement on tiny models: windows, metrics against a reference, bench fields, memory."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

from slimctl.bench import bench_model
from slimctl.bench.measure import Latency, PeakMemory
from slimctl.errors import DataError
from slimctl.evaluate import data as D, evaluate
from slimctl.evaluate.evaluation import _windows
from slimctl.models import load
from slimctl.recipe import BenchSpec, EvalSpec


@given(n=st.integers(2, 400), seq=st.integers(2, 64), stride_frac=st.floats(0.05, 1.0))
def test_windows_score_every_target_once(n, seq, stride_frac):
    stride = max(1, int(seq * stride_frac))
    scored = []
    for begin, end, first in _windows(n, seq, stride):
        assert end - begin <= seq and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_latency_percentiles_and_raw_values():
    lat = Latency.from_values([float(x) for x in range(1, 101)])
    d = lat.to_dict()
    assert d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01)
    assert d["count"] == 100 and len(d["values"]) == 100 and d["unit"] == "ms"
    with pytest.raises(ValueError):
        Latency.from_values([])


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
    assert m.peak_mb >= 64


def test_bbc_split_is_fixed_and_disjoint():
    ev, cal = D.bbc("eval"), D.bbc("calib")
    assert len(ev) + len(cal) == 2225
    assert not {e.key for e in ev} & {e.key for e in cal}
    assert [e.key for e in D.bbc("eval")[:5]] == [e.key for e in ev[:5]]
    assert {e.label for e in ev} == set(D.TOPICS)


def _perturbed(model, scale=0.05, seed=0):
    """A copy of `model` with seeded noise on every weight: a reference that differs, as a slimmed model does."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(1.0))
    return other


def test_causal_lm_kl_agreement_and_perplexity_match_a_direct_computation(tiny_llama):
    import torch.nn.functional as F

    from slimctl.evaluate import perplexity_windows, settings_for

    m = load(str(tiny_llama))
    ref = _perturbed(m.model)
    spec = EvalSpec(max_samples=2, seq_len=32, max_tokens=100)
    ev = evaluate(m.model, m.tokenizer, m.kind, spec, reference=ref)
    _, ids, _, wins = perplexity_windows(m.tokenizer, settings_for(m.kind, spec), None)
    nll = rnll = kl = agree = n = 0.0
    with torch.inference_mode():
        for begin, end, first in wins:
            lp, rp = (F.log_softmax(x(input_ids=ids[None, begin:end]).logits[0, first - begin - 1:end - begin - 1], -1)
                      for x in (m.model, ref))
            tgt = ids[first:end, None]
            nll -= lp.gather(1, tgt).sum().item()
            rnll -= rp.gather(1, tgt).sum().item()
            kl += (rp.exp() * (rp - lp)).sum().item()
            agree += (lp.argmax(-1) == rp.argmax(-1)).sum().item()
            n += end - first
    assert ev.settings["tokens_scored"] == n == 99
    assert ev.metrics["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    assert ev.reference_metrics["nll_per_token"] == pytest.approx(rnll / n, rel=1e-5)
    assert ev.vs_reference["kl_divergence"] == pytest.approx(kl / n, rel=1e-4) and ev.vs_reference["kl_divergence"] > 0
    assert ev.vs_reference["top1_agreement"] == pytest.approx(agree / n)


def test_eval_is_deterministic(tiny_llama):
    m = load(str(tiny_llama))
    spec = EvalSpec(max_samples=2, seq_len=32, max_tokens=80)
    a = evaluate(m.model, m.tokenizer, m.kind, spec).metrics
    b = evaluate(m.model, m.tokenizer, m.kind, spec).metrics
    assert a == b


def test_encoder_eval_on_bbc_matches_mean_pooled_cosines(tiny_bert):
    import torch.nn.functional as F

    m = load(str(tiny_bert))
    ref = _perturbed(m.model)
    ev = evaluate(m.model, m.tokenizer, m.kind, EvalSpec(max_samples=10, seq_len=32), reference=ref)
    assert ev.settings["test_texts"] == 10 and ev.settings["train_texts"] > 0

    def pooled(model, texts):  # sentence-transformers' mean pooling over the attention mask, L2-normalised
        enc = m.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    test = [e.text for e in D.balanced(D.bbc("eval"), 2)]
    cos = (pooled(m.model, test) * pooled(ref, test)).sum(-1)
    assert ev.vs_reference["mean_cosine"] == pytest.approx(cos.mean().item(), abs=1e-5) and cos.mean() < 0.9999
    assert ev.vs_reference["min_cosine"] == pytest.approx(cos.min().item(), abs=1e-5)


def test_classifier_accuracy_with_string_and_int_labels(tiny_classifier, tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "great stuff", "label": "pos"}, {"text": "awful", "label": 0}, {"text": "meh", "label": "neutral"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    m = load(str(tiny_classifier))
    ref = _perturbed(m.model, scale=0.5)
    ev = evaluate(m.model, m.tokenizer, m.kind, EvalSpec(data=str(f)), reference=ref)
    enc = m.tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.inference_mode():
        a, b = m.model(**enc).logits.argmax(-1), ref(**enc).logits.argmax(-1)
    labels = torch.tensor([m.model.config.label2id["pos"], 0, m.model.config.label2id["neutral"]])
    assert ev.settings["examples"] == 3
    assert ev.vs_reference["top1_agreement"] == pytest.approx((a == b).float().mean().item())
    assert ev.metrics["accuracy"] == pytest.approx((a == labels).float().mean().item())


@pytest.mark.parametrize("content, suffix, msg", [
    (b"", ".jsonl", "is empty"),
    (b"\x00\x01\x02binary", ".jsonl", "looks binary"),
    (b'{"txt": "x"}\n', ".jsonl", "needs a non-empty string field 'text'"),
    (b"not json\n", ".jsonl", "line 1 is not valid JSON"),
    (b"hello", ".csv", "must end in .txt or .jsonl"),
    (b"\xff\xfe\xfa", ".txt", "is not UTF-8"),
])
def test_bad_data_files(tmp_path, content, suffix, msg):
    f = tmp_path / f"d{suffix}"
    f.write_bytes(content)
    with pytest.raises(DataError, match=msg):
        D.read_file(f)


def test_classifier_needs_labels(tiny_classifier, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "no label"}\n')
    m = load(str(tiny_classifier))
    with pytest.raises(DataError, match="needs a 'label'"):
        evaluate(m.model, m.tokenizer, m.kind, EvalSpec(data=str(f)))
    f.write_text('{"text": "x", "label": "maybe"}\n')
    with pytest.raises(DataError, match="not one of the model's labels"):
        evaluate(m.model, m.tokenizer, m.kind, EvalSpec(data=str(f)))


FAST = dict(min_iters=3, min_seconds=0, warmup=1)


def test_bench_causal_reports_prefill_decode_and_raw_samples(tiny_llama):
    m = load(str(tiny_llama))
    r = bench_model(m.model, m.tokenizer, m.kind, BenchSpec(batch_size=2, seq_len=16, decode_tokens=4, **FAST), m.path)
    assert r.latency_of == "request" and r.phases["request"].latency_ms.count >= 3
    assert len(r.phases["decode_step"].latency_ms.values) >= 3 * 4
    assert r.decode_tokens_per_s > 0 and r.prefill_ms.p50 > 0
    assert r.latency_ms.p50 <= r.latency_ms.p90 <= r.latency_ms.p99
    assert r.peak_memory_mb > 0 and r.size_mb > 0 and r.threads >= 1


def test_bench_encoder(tiny_bert):
    m = load(str(tiny_bert))
    r = bench_model(m.model, m.tokenizer, m.kind, BenchSpec(batch_size=4, seq_len=32, **FAST), m.path)
    assert r.latency_of == "forward" and r.throughput.tokens_per_s == pytest.approx(r.throughput.samples_per_s * 32)


def test_bench_threads_apply_to_the_run_and_are_given_back(tiny_bert):
    import torch

    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    m = load(str(tiny_bert))
    r = bench_model(m.model, m.tokenizer, m.kind, BenchSpec(batch_size=2, seq_len=8, threads=want, **FAST), m.path)
    assert r.threads == want and torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_cuda_without_gpu_is_a_device_error(tiny_bert):
    from slimctl.errors import DeviceError

    m = load(str(tiny_bert))
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        bench_model(m.model, m.tokenizer, m.kind, BenchSpec(device="cuda"), m.path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_cuda(tiny_llama):
    m = load(str(tiny_llama))
    r = bench_model(m.model, m.tokenizer, m.kind, BenchSpec(device="cuda", decode_tokens=4, **FAST), m.path)
    assert r.device == "cuda" and r.peak_memory_mb > 0


def test_windows_start_with_bos_when_the_tokenizer_adds_it(tiny_llama):
    """Gemma/Llama-3-style tokenizers start every input with BOS: each perplexity window gets it too,
    and the scored logits are the window's own (the BOS position is not scored)."""
    import torch.nn.functional as F

    from slimctl.evaluate import bos_prefix, perplexity_windows, settings_for

    m = load(str(tiny_llama))
    tok = m.tokenizer
    assert bos_prefix(tok) == []
    tok.bos_token = tok.cls_token  # the BERT test tokenizer already starts every input with [CLS]
    bos = tok.bos_token_id
    assert bos_prefix(tok) == [bos]
    spec = EvalSpec(max_samples=2, seq_len=32, max_tokens=64)
    ev = evaluate(m.model, m.tokenizer, m.kind, spec)
    assert ev.settings["bos_each_window"] is True
    _, ids, _, wins = perplexity_windows(tok, settings_for(m.kind, spec), None)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in wins:
            lg = m.model(input_ids=torch.cat([torch.tensor([bos]), ids[begin:end]])[None]).logits[0, 1:]
            logp = F.log_softmax(lg[first - begin - 1:end - begin - 1], -1)
            nll -= logp.gather(1, ids[first:end, None]).sum().item()
            n += end - first
    assert ev.settings["tokens_scored"] == n
    assert ev.metrics["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)


_HEAP = """
import gc, sys
from slimctl.heap import own_heap
from slimctl.models import load
load(sys.argv[1])
print(gc.get_freeze_count())  # a library caller's process: nothing frozen
own_heap()
m = load(sys.argv[1])
frozen = gc.get_freeze_count()
del m
load(sys.argv[1])
print(frozen, gc.get_freeze_count())
"""


def test_a_process_slimctl_owns_freezes_its_heap_once_before_its_first_model(tiny_llama):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _HEAP, str(tiny_llama)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.split("\n")
    assert lines[0] == "0"
    frozen, later = map(int, lines[1].split())
    # torch's and transformers' objects, frozen once: the second load adds none (a few frozen ones were freed by
    # reference counting, which freezing leaves alone)
    assert frozen > 100_000 and later <= frozen
