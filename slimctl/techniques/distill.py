"""Recovery by distillation (Minitron): after pruning, train the smaller model to match the teacher's
next-token distribution (forward KL on logits at temperature 1) on calibration text or a user file,
on text the teacher writes itself (LLM-QAT's data-free generation), or on both, with AdamW, a linear
warm-up and cosine decay from `lr` to `min_lr`, under a token budget. The teacher is the model before
the recipe's steps (or `teacher:`). Deterministic under the recipe's seed; a first Ctrl-C ends training
early and keeps the weights reached (said in the report), never a half-written model."""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Literal, Optional

import torch
from pydantic import Field

from ..errors import DataError, RecipeError, UnsupportedError
from ..kinds import CAUSAL_LM
from .registry import StepContext, TechniqueConfig, register


class DistillConfig(TechniqueConfig):
    tokens: int = Field(default=65_536, ge=64, le=10_000_000_000)  # training tokens: the budget
    seq_len: int = Field(default=256, ge=16, le=32_768)
    batch_size: int = Field(default=4, ge=1, le=4096)  # sequences per optimiser step
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    min_lr: float = Field(default=1e-5, ge=0.0, le=1.0)
    warmup: float = Field(default=0.05, ge=0.0, lt=1.0)  # share of the steps
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    data: Optional[str] = None  # .txt / .jsonl; default: the BBC calibration split (disjoint from eval)
    # text: `data` (or the calibration split); generated: rows the teacher writes (LLM-QAT: a random first token,
    # its next GREEDY_HEAD tokens top-1, then sampled), no corpus's domain; mixed: the two interleaved, half each
    source: Literal["text", "generated", "mixed"] = "text"
    held_out: int = Field(default=8, ge=1, le=10_000)  # sequences never trained on: KL before/after
    teacher: Optional[str] = None  # built-in name, folder or hub id; default: the model before the recipe
    device: Optional[Literal["cpu", "cuda"]] = None  # default: the recipe's device (where it calibrates)
    train: Literal["blocks", "all"] = "blocks"  # blocks: embeddings, LM head and final norm stay as they are
    max_minutes: Optional[float] = Field(default=None, gt=0.0)  # stop at this wall time (tokens used: reported)
    # the teacher's and student's forwards and the backward under bfloat16 autocast (weights, gradients and AdamW's
    # state stay float32: mixed precision as Minitron trains); auto: bfloat16 where the CPU computes it natively
    # (AVX512-BF16/AMX), float32 elsewhere; on CUDA, bfloat16. The held-out KL is always measured in float32.
    train_dtype: Literal["float32", "bfloat16", "auto"] = "auto"


def sequences(tokenizer, data: str | None, seq_len: int, seed: int) -> torch.Tensor:
    """The text as one token stream (each document as the tokenizer encodes it alone), cut into
    seq_len rows, in a seeded order (held-out rows are then a sample of the whole text, like the rest)."""
    from ..evaluate import data as datasets

    texts = [e.text for e in (datasets.read_file(data) if data else datasets.bbc("calib"))]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"]
    rows = len(ids) // seq_len
    if rows < 2:
        raise DataError(f"distill needs at least {2 * seq_len} tokens of text; {data or 'the calibration split'} has {len(ids)}")
    seqs = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return seqs[order]


GREEDY_HEAD = 4  # LLM-QAT: the first 3-5 generated tokens are the teacher's top-1, the rest sampled
# rows written at once, one KV cache each: 233 tokens/s at 32, 429 at 128, 494 at 256 (smollm2-135m, 2-vCPU Intel Xeon,
# bfloat16 autocast, 128 tokens per row)
GENERATE_BATCH = 128


def generated(teacher, tokenizer, rows: int, seq_len: int, seed: int, device, track=None,
              autocast=contextlib.nullcontext) -> torch.Tensor:
    """`rows` sequences of `seq_len` tokens the teacher writes (LLM-QAT, Liu et al. 2023): each starts from a
    token drawn uniformly from the vocabulary (special tokens excluded), takes the teacher's top-1 for the
    next GREEDY_HEAD tokens, then samples from its softmax; one KV cache per batch. Seeded."""
    from ..quant.kvcache import cache_arg, cache_of

    g, arg = torch.Generator().manual_seed(seed), cache_arg(teacher)  # the cache's keyword in this transformers
    vocab = min(len(tokenizer), teacher.config.vocab_size)
    special = torch.tensor(sorted(i for i in tokenizer.all_special_ids if i < vocab), dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special] = False
    starts = allowed.nonzero().flatten()
    batches = range(0, rows, GENERATE_BATCH)
    out = []
    with torch.inference_mode():
        for b0 in (track or (lambda it, desc, total: it))(batches, "distill: teacher writes its text", len(batches)):
            n = min(GENERATE_BATCH, rows - b0)
            x = starts[torch.randint(len(starts), (n, 1), generator=g)]
            seq, past = [x], None
            for t in range(seq_len - 1):
                with autocast():
                    o = teacher(input_ids=x.to(device), use_cache=True, **({arg: past} if past is not None else {}))
                past, logits = cache_of(o), o.logits[:, -1, :vocab].float().cpu()
                x = logits.argmax(-1, keepdim=True) if t < GREEDY_HEAD else torch.multinomial(logits.softmax(-1), 1, generator=g)
                seq.append(x)
            out.append(torch.cat(seq, 1))
    return torch.cat(out)


def training_rows(cfg: DistillConfig, teacher, tokenizer, seed: int, device, track=None) -> torch.Tensor:
    """The rows to train and hold out on, by `source`: the text, the teacher's own, or both interleaved."""
    need = planned_steps(cfg) * cfg.batch_size + cfg.held_out
    if cfg.source == "text":
        return sequences(tokenizer, cfg.data, cfg.seq_len, seed)
    gen = generated(teacher, tokenizer, need if cfg.source == "generated" else (need + 1) // 2, cfg.seq_len, seed, device, track,
                    _autocast(train_precision(cfg, device), device))
    if cfg.source == "generated":
        return gen
    text = sequences(tokenizer, cfg.data, cfg.seq_len, seed)[: len(gen)]
    mixed = torch.empty((len(text) + len(gen), cfg.seq_len), dtype=torch.long)
    k = min(len(text), len(gen))
    mixed[0:2 * k:2], mixed[1:2 * k:2] = text[:k], gen[:k]  # alternate: every batch and the held-out rows hold both
    mixed[2 * k:] = torch.cat([text[k:], gen[k:]])
    return mixed


def planned_steps(cfg: DistillConfig) -> int:
    """Optimiser steps the token budget buys (at least one)."""
    return max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token, averaged, at `temperature` (× T², as Hinton et al.)."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    p_log = t.log_softmax(-1)
    return (p_log.exp() * (p_log - s.log_softmax(-1))).sum(-1).mean() * temperature ** 2


KL_ROWS = 64  # tokens per chunk of the fused loss: a few [rows, vocab] float temporaries at a time


class _FusedKL(torch.autograd.Function):
    """kl_loss and its gradient T·(softmax(s/T) − softmax(t/T)) / tokens in one pass over chunks of tokens: the
    same values, but autograd keeps one [tokens, vocab] tensor (the gradient) instead of three, and no
    full-size temporaries are made (on a 49k vocabulary, 0.6 s -> about 0.25 s per step of 1,024 tokens)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float):
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        grad = torch.empty(s2.shape, dtype=torch.float32, device=s.device)
        total = 0.0
        for r in range(0, s2.shape[0], KL_ROWS):
            t_r, s_r = t2[r:r + KL_ROWS].float(), s2[r:r + KL_ROWS].float()
            p_log = (t_r / temperature if temperature != 1 else t_r).log_softmax(-1)
            q_log = (s_r / temperature if temperature != 1 else s_r).log_softmax(-1)
            total += float(torch.nn.functional.kl_div(q_log, p_log, reduction="sum", log_target=True))
            torch.sub(q_log.exp_(), p_log.exp_(), out=grad[r:r + KL_ROWS]).mul_(temperature / s2.shape[0])
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = s.shape, s.dtype
        return torch.tensor(total / s2.shape[0] * temperature ** 2, dtype=torch.float32, device=s.device)

    @staticmethod
    def backward(ctx, out_grad):
        (grad,) = ctx.saved_tensors
        return (grad * out_grad).reshape(ctx.shape).to(ctx.dtype), None, None


def fused_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """kl_loss, computed in chunks with its gradient formed directly (training)."""
    return _FusedKL.apply(student_logits, teacher_logits.detach(), temperature)


def lr_at(step: int, steps: int, cfg: DistillConfig) -> float:
    warm = int(cfg.warmup * steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    done = (step - warm) / max(steps - warm - 1, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(done, 1.0)))


def held_out_kl(student, teacher, rows: torch.Tensor, device, temperature: float) -> float:
    total = 0.0
    with torch.inference_mode():
        for r in rows:
            x = r[None].to(device)
            total += float(kl_loss(student(input_ids=x).logits, teacher(input_ids=x).logits, temperature))
    return total / len(rows)


def _teacher(cfg: DistillConfig, ctx: StepContext):
    if cfg.teacher is not None:
        from ..models import load

        return load(cfg.teacher).model
    if ctx.teacher is None:
        raise RecipeError("distill needs a teacher: put it after a prune step (the teacher is then the model before "
                          "the recipe's steps) or name one with teacher:")
    return ctx.teacher


def _trainable(model, cfg: DistillConfig) -> list[torch.nn.Parameter]:
    from ..stream.blocks import find_blocks

    if cfg.train == "all":
        params = list(model.parameters())
    else:
        params = list(find_blocks(model)[1].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def train_precision(cfg: DistillConfig, device) -> str:
    """'float32' or 'bfloat16': what `train_dtype` means on this device."""
    from .precision import resolve

    if cfg.train_dtype == "auto" and device.type == "cuda":
        return "bfloat16"
    return resolve(cfg.train_dtype)


def _autocast(precision: str, device):
    """The context the teacher's and student's forwards run in at `precision` (bfloat16 autocast or nothing)."""
    if precision == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _loop(model, teacher, train: torch.Tensor, cfg: DistillConfig, ctx: StepContext, device) -> dict:
    """The optimiser loop; returns steps done, tokens, loss curve, stop reason."""
    precision = train_precision(cfg, device)
    autocast = _autocast(precision, device)
    params = _trainable(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = planned_steps(cfg)
    curve, state = [], {"loss": float("nan"), "tok_s": 0.0}
    t0, stop, done = time.perf_counter(), "budget", 0
    every = max(1, steps // 50)
    model.train(False)  # no dropout: the teacher's and the student's forwards must be comparable
    try:
        for step in ctx.track(range(steps), lambda: f"distill loss {state['loss']:.4f} · {state['tok_s']:.0f} tok/s", steps):
            rows = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % len(train)
            x = train[rows].to(device)
            with torch.no_grad(), autocast():
                target = teacher(input_ids=x).logits
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, cfg)
            with torch.enable_grad():
                with autocast():
                    logits = model(input_ids=x).logits
                loss = fused_kl_loss(logits, target, cfg.temperature)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            state["loss"] = float(loss.detach())
            state["tok_s"] = done * x.numel() / (time.perf_counter() - t0)
            if step % every == 0 or done == steps:
                curve.append([done * x.numel(), round(state["loss"], 5)])
            if cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                stop = "max_minutes"
                break
    except KeyboardInterrupt:  # the first Ctrl-C ends training; the weights reached are kept and reported
        stop = "interrupted"
        ctx.notes.append(f"distill interrupted after {done} of {steps} steps; the model keeps the weights it reached")
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    return {"precision": precision, "steps": done, "steps_planned": steps, "tokens": done * cfg.batch_size * cfg.seq_len, "stopped": stop,
            "train_seconds": round(time.perf_counter() - t0, 1), "loss_curve": curve}


@register("distill", "train", DistillConfig,
          "recover a pruned model by distilling the model before the recipe into it (forward KL on logits, Minitron); a token budget")
def apply(model, cfg: DistillConfig, ctx: StepContext) -> dict:
    from ..stream.skeleton import refuse, stream_of

    if ctx.kind != CAUSAL_LM:
        raise UnsupportedError("distill trains causal language models (next-token logits); this model is not one")
    if stream_of(model):
        refuse("distillation (it trains the whole model in memory)")
    from .placement import device_type

    name = cfg.device or device_type()
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("distill device cuda: no CUDA GPU is visible to torch")
    teacher = _teacher(cfg, ctx)
    device = torch.device(name)
    torch.manual_seed(ctx.seed)
    model.to(device)
    teacher.to(device)
    try:
        t0 = time.perf_counter()
        seqs = training_rows(cfg, teacher, ctx.tokenizer, ctx.seed, device, ctx.track)
        written = round(time.perf_counter() - t0, 1) if cfg.source != "text" else None
        held = min(cfg.held_out, len(seqs) // 2)
        train, test = seqs[held:], seqs[:held]
        before = held_out_kl(model, teacher, test, device, cfg.temperature)
        run = _loop(model, teacher, train, cfg, ctx, device)
        after = held_out_kl(model, teacher, test, device, cfg.temperature)
    finally:
        model.to("cpu")
        teacher.to("cpu")
    if run["tokens"] > train.numel():
        ctx.notes.append(f"distill saw its {train.numel()} training tokens {run['tokens'] / train.numel():.1f} times (give more text with data:)")
    return {**run, "held_out_kl_before": round(before, 5), "held_out_kl_after": round(after, 5),
            "held_out_tokens": test.numel(), "train_tokens_available": train.numel(), "source": cfg.source,
            **({"generate_seconds": written} if written is not None else {}), "teacher": cfg.teacher or "the model before the recipe"}
