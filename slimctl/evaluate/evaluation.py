"""Accuracy of a model, alone or side by side with its reference: perplexity, embedding fidelity,
topic and classification accuracy, and top-1 agreement / KL divergence against the reference.

Side by side means one pass over the data runs both models on the same inputs, so the baseline's
metrics and the comparison come from the same windows without storing the baseline's logits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..results.report import EvalResult, KernelPlan, ModelEval
from ..kinds import CAUSAL_LM, ENCODER, SEQ_CLS
from ..specs import EvalSpec
from . import data as datasets

Track = Callable[[Iterable, str, int], Iterable]


def _no_track(it: Iterable, desc: str, total: int) -> Iterable:
    return it


DEFAULTS = {
    # perplexity: `max_samples` held-out articles (or documents of a .jsonl; a .txt is one stream),
    # joined with EOS, scored in windows of seq_len
    CAUSAL_LM: {"max_samples": 32, "seq_len": 512, "max_tokens": 16_384},
    # embeddings: `max_samples` held-out test articles (balanced by topic), 20 per topic to fit centroids
    ENCODER: {"max_samples": 100, "seq_len": 128},
    SEQ_CLS: {"max_samples": 1000, "seq_len": 128},
}
ENCODER_TRAIN_PER_TOPIC = 20
BATCH = 16
FEW_TOKENS = 4_096  # a perplexity from fewer scored tokens than this gets a warning (its noise is large)


@dataclass
class Evaluation:
    """One evaluation while it is measured, under results.report.EvalResult's names; to_dict() is its JSON form
    (a side-by-side one: side() splits it into the report's two sides)."""

    kind: str
    dataset: str
    settings: dict[str, Any]
    metrics: dict[str, Any]  # of the evaluated model
    reference_metrics: dict[str, Any] | None = None  # of the reference, from the same pass
    vs_reference: dict[str, Any] | None = None  # model vs reference (agreement, KL, ratios)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.dataset, "settings": self.settings, "metrics": self.metrics,
                "reference_metrics": self.reference_metrics, "vs_reference": self.vs_reference, "seconds": round(self.seconds, 3),
                "warnings": self.warnings, **self.extra}

    def result(self, kernels: dict[str, Any] | None = None) -> EvalResult:
        """The typed result, with the kernel plan the evaluated model ran (None: plain torch)."""
        return EvalResult.model_validate({**self.to_dict(), "kernels": kernels})


def settings_for(kind: str, spec: EvalSpec) -> dict[str, Any]:
    d = dict(DEFAULTS[kind])
    for k in ("max_samples", "seq_len", "max_tokens"):
        if getattr(spec, k, None) is not None and k in d:
            d[k] = getattr(spec, k)
    if kind == CAUSAL_LM:
        if spec.kv_cache != "fp":
            d["kv_cache"] = spec.kv_cache
        d["stride"] = spec.stride or d["seq_len"]
        if d["stride"] > d["seq_len"]:
            raise DataError(f"eval stride {d['stride']} is larger than seq_len {d['seq_len']}")
    d["data"] = spec.data or "bbc-news"
    return d


def evaluate(model, tokenizer, kind: str, spec: EvalSpec, reference=None, seed: int = 0,
             track: Track = _no_track, taskset=None) -> Evaluation:
    """The kind's own metrics, then any lm-eval tasks of `spec` (`taskset`: already prepared ones)."""
    torch.manual_seed(seed)
    s = settings_for(kind, spec)
    if spec.tasks and taskset is None:
        taskset = prepare_tasks(kind, spec)
    t0 = time.perf_counter()
    fn = {CAUSAL_LM: _causal_lm, ENCODER: _encoder, SEQ_CLS: _seq_cls}[kind]
    with torch.inference_mode():
        ev = fn(model, tokenizer, s, spec.data, reference, track)
    if taskset is not None:
        from . import tasks

        ev.extra["tasks"] = tasks.run(model, tokenizer, taskset, reference, spec.task_limit, spec.task_batch_size)
    ev.seconds = time.perf_counter() - t0
    return ev


def prepare_tasks(kind: str, spec: EvalSpec):
    """Check the spec's lm-eval tasks load (data found, offline or not) before any long work."""
    if not spec.tasks:
        return None
    if kind != CAUSAL_LM:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"lm-eval tasks score a causal LM's loglikelihoods; this is a {kind} model")
    from . import tasks

    return tasks.prepare(spec.tasks)


def _device(model) -> torch.device:
    return next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")


# --- causal LM: perplexity over a token stream --------------------------------------------------

def _encode_prefix(tokenizer, text: str, need: int) -> list[int]:
    """At least `need` tokens of `text` (or all of it) without tokenizing a huge file whole: a prefix
    of 8 characters per token needed, doubled until it gives enough. Only the tokens at the cut can
    differ from a whole-text encoding, and those lie past `need`, so they are dropped."""
    chars = max(need * 8, 1024)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text) or len(ids) > need + 8:
            return ids if chars >= len(text) else ids[:need]
        chars *= 2


def _token_stream(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, int]:
    """The texts' tokens joined with EOS, capped at `max_tokens`; also how many the texts held
    (up to one past the cap: enough to tell "capped" from "ran out")."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(_encode_prefix(tokenizer, t, max_tokens + 1 - len(ids)))
        if eos is not None:
            ids.append(eos)
        if len(ids) > max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long), len(ids)


def _windows(n: int, seq_len: int, stride: int):
    """(begin, end, first scored target) per window; each target token 1..n-1 is scored exactly once.

    A window starts at most one token before the previous window's end, so the first new target
    always has context; with stride == seq_len the windows overlap by that one token only.
    """
    prev_end, begin = 0, 0
    while prev_end < n:
        end = min(begin + seq_len, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        begin = min(begin + stride, end - 1)


def perplexity_windows(tok, s, data) -> tuple[list[str], torch.Tensor, int, list]:
    """The eval texts, their token stream, how many tokens they held, and the scored windows."""
    texts = [e.text for e in (datasets.read_file(data, stream=True) if data else datasets.bbc("eval"))][: s["max_samples"]]
    ids, held = _token_stream(tok, texts, s["max_tokens"])
    if ids.numel() < 2:
        raise DataError("eval data gives fewer than 2 tokens; pass more text")
    if data and held < min(s["seq_len"], s["max_tokens"]):
        raise DataError(f"eval data {data} gives {held} tokens, fewer than one eval window ({s['seq_len']} tokens); "
                        f"pass more text, or a smaller --seq-len")
    return texts, ids, held, list(_windows(ids.numel(), s["seq_len"], s["stride"]))


def bos_prefix(tok) -> list[int]:
    """[BOS] when the tokenizer starts every input with it (Gemma, Llama 2/3), else []: each window is
    fed the way the model was trained to see text. Gemma without BOS scores ~x3 worse perplexity."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("a")["input_ids"][:1] == [bos] else []


def window_input(ids: torch.Tensor, begin: int, end: int, prefix: list[int]) -> torch.Tensor:
    """One window's input ids (1 x len), the prefix first; logits for the window start at len(prefix)."""
    return torch.cat([torch.tensor(prefix, dtype=torch.long), ids[begin:end]]).unsqueeze(0)


def check_vocabulary(models: list, ids: torch.Tensor, prefix: list[int]) -> None:
    """A token id the model's embedding has no row for (a tokenizer that gained a token without
    resize_token_embeddings) is the input's fault: one clear error instead of an IndexError mid-eval."""
    top = max([int(ids.max())] + list(prefix)) if ids.numel() else -1
    for m in models:
        get = getattr(m, "get_input_embeddings", None)
        rows = getattr(get() if callable(get) else None, "num_embeddings", None)
        if isinstance(rows, int) and top >= rows:
            raise DataError(f"the tokenizer gives token id {top}, but the model's embedding has {rows} rows: the tokenizer "
                            "and the model do not match (a token added to the tokenizer without resizing the embeddings?)")


def _causal_lm(model, tok, s, data, reference, track) -> Evaluation:
    texts, ids, held, wins = perplexity_windows(tok, s, data)
    dev, pre = _device(model), bos_prefix(tok)
    check_vocabulary([m for m in (model, reference) if m is not None], ids, pre)
    if pre:
        s = {**s, "bos_each_window": True}

    from ..quant.kvcache import per_request

    cache = per_request(model, s.get("kv_cache", "fp"))  # a fresh cache per window: every position reads quantized K/V

    def kv() -> dict:
        c = cache()
        return {**c, "use_cache": True} if c else c

    def logits():
        for begin, end, _ in wins:
            inp = window_input(ids, begin, end, pre).to(dev)
            ref = reference(input_ids=inp).logits[0, len(pre):] if reference is not None else None
            yield model(input_ids=inp, **kv()).logits[0, len(pre):], ref

    return score_windows(s, data, texts, ids, held, wins, logits(), track)


def score_windows(s, data, texts, ids, held, wins, logits, track) -> Evaluation:
    """Perplexity (and, with reference logits, agreement and KL) from each window's logits."""
    nll = ref_nll = kl = 0.0
    agree = scored = 0
    has_ref = False
    for (begin, end, first), (lg, rlg) in track(zip(wins, logits), "perplexity", len(wins)):
        tgt = ids[first:end].to(lg.device)
        off = first - begin - 1  # logits[i] predicts token begin+i+1
        logp = F.log_softmax(lg[off:end - begin - 1].float(), dim=-1)
        nll -= logp.gather(1, tgt[:, None]).sum().item()
        scored += tgt.numel()
        if rlg is not None:
            has_ref = True
            rlogp = F.log_softmax(rlg[off:end - begin - 1].float(), dim=-1)
            ref_nll -= rlogp.gather(1, tgt[:, None]).sum().item()
            kl += (rlogp.exp() * (rlogp - logp)).sum().item()
            agree += (rlogp.argmax(-1) == logp.argmax(-1)).sum().item()
    s = {**s, "tokens_scored": scored, "windows": len(wins), "documents": len(texts)}
    m = {"perplexity": math.exp(nll / scored), "nll_per_token": nll / scored}
    ev = Evaluation(CAUSAL_LM, s["data"], s, m, warnings=_few_tokens(scored, held > s["max_tokens"], bool(data)))
    if has_ref:
        ev.reference_metrics = {"perplexity": math.exp(ref_nll / scored), "nll_per_token": ref_nll / scored}
        ev.vs_reference = {"top1_agreement": agree / scored, "kl_divergence": kl / scored,
                        "perplexity_ratio": m["perplexity"] / ev.reference_metrics["perplexity"]}
    return ev


def _few_tokens(scored: int, capped: bool, own_data: bool) -> list[str]:
    if scored >= FEW_TOKENS:
        return []
    how = ("raise --max-tokens (and --max-samples for a .jsonl)" if capped
           else "pass a longer --data file (a .txt is read as one stream)" if own_data
           else "raise --max-samples / --max-tokens")
    return [f"perplexity was scored on only {scored:,} tokens (fewer than {FEW_TOKENS:,}), so it is noisy; to score more, {how}"]


# --- encoder: embeddings, fidelity, nearest-centroid topic accuracy -------------------------------

def _embed(model, tok, texts: list[str], seq_len: int, dev, track=_no_track, desc="embeddings") -> torch.Tensor:
    out = []
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
    for b in track(batches, desc, len(batches)):
        enc = tok(b, padding=True, truncation=True, max_length=seq_len, return_tensors="pt").to(dev)
        h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out)


def _count_tokens(tok, texts: list[str], seq_len: int) -> int:
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=seq_len)["input_ids"])


def _centroid_predict(train: torch.Tensor, train_labels: list, test: torch.Tensor) -> list:
    labels = sorted(set(train_labels), key=str)
    cents = torch.stack([train[[i for i, l in enumerate(train_labels) if l == lab]].mean(0) for lab in labels])
    idx = (test @ F.normalize(cents, dim=-1).T).argmax(-1)
    return [labels[i] for i in idx.tolist()]


def _encoder(model, tok, s, data, reference, track) -> Evaluation:
    if data:
        rows = datasets.read_file(data)[: s["max_samples"]]
        labelled = all(r.label is not None for r in rows) and len({r.label for r in rows}) > 1
        test = rows[1::2] if labelled else rows
        train = rows[0::2] if labelled else []
    else:
        per = max(1, s["max_samples"] // len(datasets.TOPICS))
        test = datasets.balanced(datasets.bbc("eval"), per)
        train = datasets.balanced(datasets.bbc("calib"), ENCODER_TRAIN_PER_TOPIC)
    dev = _device(model)
    s = {**s, "test_texts": len(test), "train_texts": len(train),
         "tokens_scored": _count_tokens(tok, [e.text for e in test], s["seq_len"])}
    models = [("model", model)] + ([("reference", reference)] if reference is not None else [])
    emb, preds = {}, {}
    for who, m in models:
        emb[who] = _embed(m, tok, [e.text for e in test], s["seq_len"], dev, track, f"embed ({who})")
        if train:
            tr = _embed(m, tok, [e.text for e in train], s["seq_len"], dev, track, f"centroids ({who})")
            preds[who] = _centroid_predict(tr, [e.label for e in train], emb[who])

    def metrics(who: str) -> dict[str, Any]:
        if who not in preds:
            return {}
        return {"topic_accuracy": sum(p == e.label for p, e in zip(preds[who], test)) / len(test)}

    ev = Evaluation(ENCODER, s["data"], s, metrics("model"))
    if reference is not None:
        cos = (emb["model"] * emb["reference"]).sum(-1)
        ev.reference_metrics = metrics("reference")
        ev.vs_reference = {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item()}
        if preds:
            ev.vs_reference["top1_agreement"] = sum(a == b for a, b in zip(preds["model"], preds["reference"])) / len(test)
    return ev


# --- sequence classifier ------------------------------------------------------------------------

def _label_ids(model, rows) -> list[int]:
    l2i = {str(k): v for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    n = model.config.num_labels
    out = []
    for r in rows:
        if isinstance(r.label, int):
            lab = r.label
        elif r.label in l2i:
            lab = l2i[r.label]
        else:
            raise DataError(f"label {r.label!r} is not one of the model's labels {sorted(l2i)}")
        if not 0 <= lab < n:
            raise DataError(f"label id {lab} is out of range for a model with {n} labels")
        out.append(lab)
    return out


def _seq_cls(model, tok, s, data, reference, track) -> Evaluation:
    if not data:
        raise DataError("sequence classifiers need --data FILE.jsonl with 'text' and 'label' fields")
    rows = datasets.read_file(data, need_label=True)[: s["max_samples"]]
    labels = torch.tensor(_label_ids(model, rows))
    dev = _device(model)
    logits = {"model": [], "reference": []}
    batches = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
    for b in track(batches, "classify", len(batches)):
        enc = tok([r.text for r in b], padding=True, truncation=True, max_length=s["seq_len"], return_tensors="pt").to(dev)
        logits["model"].append(model(**enc).logits.float().cpu())
        if reference is not None:
            logits["reference"].append(reference(**enc).logits.float().cpu())
    lm = torch.cat(logits["model"])
    s = {**s, "examples": len(rows), "tokens_scored": _count_tokens(tok, [r.text for r in rows], s["seq_len"])}
    ev = Evaluation(SEQ_CLS, s["data"], s, {"accuracy": (lm.argmax(-1) == labels).float().mean().item()})
    if reference is not None:
        lr = torch.cat(logits["reference"])
        ev.reference_metrics = {"accuracy": (lr.argmax(-1) == labels).float().mean().item()}
        lp, rp = F.log_softmax(lm, -1), F.log_softmax(lr, -1)
        ev.vs_reference = {"top1_agreement": (lm.argmax(-1) == lr.argmax(-1)).float().mean().item(),
                        "kl_divergence": (rp.exp() * (rp - lp)).sum(-1).mean().item()}
    return ev


def evaluate_model(model: str, against: str | None = None, spec: EvalSpec | None = None, kernels: str = "auto",
                   seed: int = 0, load_options: dict | None = None, say=lambda m: None, track=None) -> dict[str, Any]:
    """`slimctl eval`: a model's accuracy on spec's data (and lm-eval tasks), with agreement metrics
    against a baseline model when given. Returns the evaluation with `warnings` (results.report.ModelEval's
    JSON form, as the API gives it)."""
    from ..errors import UsageError
    from ..quant.kernels import maybe_accelerate
    from ..models import load

    spec = spec or EvalSpec()
    if spec.data:
        from .data import read_file

        read_file(spec.data)  # bad data fails before a model loads
    opts = load_options or {}
    m = load(model, progress=say, **opts)
    taskset = prepare_tasks(m.kind, spec)
    ref = load(against, progress=say, **opts) if against else None
    if ref is None and spec.kv_cache != "fp" and m.kind == CAUSAL_LM:
        # the cost of the quantized KV cache: the same model with its fp cache is the reference
        ref = load(model, progress=say, **opts) if m.meta.get("format") == "gguf" else m
        against = f"{model} (fp KV cache)"
    if ref is not None and ref.kind != m.kind:
        raise UsageError(f"the baseline {against} is a {ref.kind} model but {model} is a {m.kind} model")
    plans = [maybe_accelerate(x.model, kernels, kind=x.kind) for x in (m, ref if ref is not m else None) if x is not None]
    # a GGUF against its source: one token stream, the source's own tokenizer (llama.cpp's is built from it)
    tok = ref.tokenizer if ref is not None and m.meta.get("format") == "gguf" else m.tokenizer
    ev = evaluate(m.model, tok, m.kind, spec, reference=ref.model if ref else None, seed=seed,
                  taskset=taskset, **({"track": track} if track else {}))
    plan = KernelPlan.model_validate(plans[0]) if plans[0] else None
    if plan and plan.warning:
        ev.warnings.append(plan.warning)
    return ModelEval.model_validate({"model": model, "against": against, **ev.to_dict(), "kernels": plan}).to_json()
