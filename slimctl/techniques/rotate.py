"""Rotate: fold an orthogonal rotation of the residual stream (and of each attention head's values) into the
weights, as QuaRot and SpinQuant do for weight-only quantization. The rotated float model computes the same
function (checked on calibration text before the step returns), stays an ordinary checkpoint of its family,
and spreads outlier channels over all of them, so a later GPTQ/AWQ/RTN step rounds with less error.

Steps (QuaRot section 4, SpinQuant R1/R2): each RMSNorm's scale moves into the Linears that read it (the
norm keeps weight 1); the embedding's columns, every reader's input columns and the LM head's columns are
multiplied by Q; every writer to the residual (o_proj, down_proj, experts' down) has its rows multiplied by
Qᵀ; per head, v's output rows by Hᵀ and o's input columns by H. A tied LM head is untied when the final
norm's scale has to move into it (said in a note)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..stream.blocks import find_blocks
from ..errors import UnsupportedError
from ..families import model_type, require, text_config
from ..families.folding import BlockFold, block_folds
from ..quant.hadamard import rotation
from ..kinds import CAUSAL_LM
from .registry import StepContext, TechniqueConfig, register
from .tying import module_name, shares_embedding, untie


class RotateConfig(TechniqueConfig):
    """R1 and/or R2 of SpinQuant, random rather than learned."""

    rotation: Literal["hadamard", "random"] = "hadamard"  # randomised Hadamard (QuaRot) or Haar-random orthogonal
    residual: bool = True  # R1: rotate the residual stream (norm scales fused into their readers)
    heads: bool = True  # R2: rotate each head's values (v rows, o columns) by a Hadamard of the head size
    seed: Optional[int] = Field(default=None, ge=0)  # default: the recipe's seed
    tolerance: float = Field(default=1e-3, gt=0)  # max |Δ log-prob| allowed on the check batch (fp32 model)

    @model_validator(mode="after")
    def _something(self):
        if not (self.residual or self.heads):
            raise ValueError("residual and heads are both false: nothing to rotate")
        return self


def _is_rms(norm: nn.Module) -> bool:
    return "rms" in type(norm).__name__.lower() and getattr(norm, "bias", None) is None


def norm_scale(norm: nn.Module, offset: float) -> torch.Tensor:
    return offset + norm.weight.detach().double()


def _fuse_norm(norm: nn.Module, offset: float, readers: list[nn.Linear]) -> None:
    """Readers' input columns × (offset + w); the norm then computes x̂ · 1."""
    scale = norm_scale(norm, offset)
    with torch.no_grad():
        for lin in readers:
            lin.weight.copy_((lin.weight.double() * scale[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0 - offset)


def _read(lin: nn.Module, q: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


def _write(lin: nn.Linear, q: torch.Tensor, rows: slice | None = None) -> None:
    """Output rows (a slice of them for a fused producer) rotated: y' = y Q."""
    r = rows or slice(None)
    with torch.no_grad():
        lin.weight[r] = (q.T @ lin.weight[r].double()).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias[r] = (lin.bias[r].double() @ q).to(lin.bias.dtype)


def _rotate_heads(block: nn.Module, fold: BlockFold, h: torch.Tensor) -> None:
    """v's output rows per kv head × Hᵀ (values come out as v H), o's input columns per query head × H."""
    prev, o = block.get_submodule(fold.prev), block.get_submodule(fold.linears[0])
    r = fold.rows or slice(None)
    d = fold.head_dim
    with torch.no_grad():
        w = prev.weight[r].double()
        prev.weight[r] = torch.einsum("ji,hjc->hic", h, w.view(-1, d, w.shape[1])).reshape(w.shape).to(prev.weight.dtype)
        if prev.bias is not None:
            b = prev.bias[r].double()
            prev.bias[r] = (b.view(-1, d) @ h).reshape(-1).to(prev.bias.dtype)
        wo = o.weight.double()
        o.weight.copy_((wo.view(wo.shape[0], -1, d) @ h).reshape(wo.shape).to(o.weight.dtype))


def residual_roles(block: nn.Module, folds: list[BlockFold], hidden: int, where: str):
    """(norm -> readers, writers, head folds) of one block, or an error naming what does not fit."""
    reading, writers, heads = [], [], []
    for f in folds:
        if f.how == "norm":
            norm = block.get_submodule(f.prev)
            if not _is_rms(norm):
                raise UnsupportedError(f"{where}.{f.prev} is a {type(norm).__name__}: rotate folds RMSNorm only "
                                       "(a LayerNorm's mean subtraction and bias do not commute with a rotation)")
            reading.append((norm, f.offset, [block.get_submodule(n) for n in f.linears]))
        else:
            writers += [n for n in f.linears if block.get_submodule(n).weight.shape[0] == hidden]
            if f.head_dim:
                heads.append(f)
    readers = {id(lin) for _, _, lins in reading for lin in lins}
    norms = {id(n) for n, _, _ in reading}
    extra = [n for n, m in block.named_modules() if "norm" in type(m).__name__.lower() and id(m) not in norms
             and getattr(m, "weight", None) is not None and m.weight.shape[0] == hidden]
    if extra:
        raise UnsupportedError(f"{where} normalises the residual stream where no Linear reads it ({', '.join(extra)}: "
                               "post-norms, as in Gemma 2/3): a rotation does not fold through them")
    for n, m in block.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in readers and n not in writers and m.weight.shape[1] == hidden \
                and not any(n in f.linears for f in folds):
            raise UnsupportedError(f"{where}.{n} reads a {hidden}-wide input that no family fold names; "
                                   "slimctl cannot tell whether it reads the residual stream")
    return reading, [block.get_submodule(n) for n in dict.fromkeys(writers)], heads


def final_norm(model, prefix: str) -> nn.Module:
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = getattr(parent, "norm", None)
    if norm is None or not _is_rms(norm):
        raise UnsupportedError(f"found no final RMSNorm next to {prefix} (found {type(norm).__name__ if norm else 'none'})")
    return norm


def _untie(model, head: nn.Linear, ctx: StepContext) -> None:
    untie(model, module_name(model, head))
    ctx.notes.append(f"rotate untied the LM head from the embedding (the final norm's scale moves into the head): "
                     f"the artifact stores {head.weight.numel() / 1e6:.1f} M more parameters")


def check_batch(model, ctx: StepContext) -> dict:
    from .calibrate import calibration_batches

    if ctx.tokenizer is not None:
        return calibration_batches(ctx.tokenizer, ctx.kind, 1, 64, None, ctx.seed)[0]
    vocab = model.get_input_embeddings().weight.shape[0]
    return {"input_ids": torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(ctx.seed))}


def logprobs(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch, use_cache=False).logits.float().log_softmax(-1)


def rotate_residual(model, prefix: str, resolved: list, q: torch.Tensor, ctx: StepContext, untie: bool = True) -> bool:
    """R1: norms fused into their readers, readers' columns x Q, writers' rows x Qᵀ, embedding and head.
    Returns whether the head is still tied to the embedding. With untie=False a tied head stays tied and the
    final norm keeps its scale in the old basis: the caller sets it (slice.py fits one)."""
    offset = require(model, "rotate").norm_offset
    final, emb, head = final_norm(model, prefix), model.get_input_embeddings(), model.get_output_embeddings()
    if untie and shares_embedding(model, head) and not torch.all(norm_scale(final, offset) == 1):
        _untie(model, head, ctx)
    for reading, writers, _ in resolved:
        for norm, off, readers in reading:
            _fuse_norm(norm, off, readers)
            for lin in readers:
                _read(lin, q)
        for lin in writers:
            _write(lin, q)
    tied = shares_embedding(model, head)
    if not tied:
        _fuse_norm(final, offset, [head])
    with torch.no_grad():
        emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    if not tied:
        _read(head, q)
    return tied


def _apply_rotation(model, cfg: RotateConfig, seed: int, ctx: StepContext) -> dict:
    hidden = text_config(model.config).hidden_size
    prefix, blocks = find_blocks(model)
    resolved = [residual_roles(block, block_folds(model, block)[0], hidden, f"{prefix}.{i}") for i, block in enumerate(blocks)]
    out = {"rotation": None, "blocks": len(blocks)}
    if cfg.residual:
        q, out["rotation"] = rotation(hidden, cfg.rotation, seed)
        out["tied_head"] = rotate_residual(model, prefix, resolved, q, ctx)
    per_head: dict[int, torch.Tensor] = {}
    for (_, _, heads), block in zip(resolved, blocks):
        for f in heads if cfg.heads else ():
            h = per_head.setdefault(f.head_dim, rotation(f.head_dim, "hadamard", seed + 1)[0])
            _rotate_heads(block, f, h)
    out["head_rotation"] = ", ".join(f"randomised Hadamard {d}x{d}" for d in per_head) or None
    return out


@register("rotate", "transform", RotateConfig,
          "fold a randomised Hadamard rotation into the weights (QuaRot/SpinQuant R1+R2): same function, "
          "fewer outliers for a later GPTQ/AWQ/RTN step; reloads with plain transformers")
def rotate(model, cfg: RotateConfig, ctx: StepContext) -> dict:
    if ctx.kind != CAUSAL_LM:
        raise UnsupportedError(f"rotate handles causal LMs (decoder blocks with RMSNorm); this model is a {ctx.kind}")
    require(model, "rotate")
    if getattr(text_config(model.config), "hidden_size", None) is None:
        raise UnsupportedError(f"model type '{model_type(model)}' has no hidden_size in its config")
    batch = check_batch(model, ctx)
    before = logprobs(model, batch)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tie_before = (getattr(text_config(model.config), "tie_word_embeddings", None),
                  getattr(model, "all_tied_weights_keys", None))
    try:
        stats = _apply_rotation(model, cfg, ctx.seed if cfg.seed is None else cfg.seed, ctx)
    except BaseException:  # a refusal found midway, or Ctrl-C: the model goes back as it was
        _restore(model, saved, tie_before)
        raise
    err = float((logprobs(model, batch) - before).abs().max())
    tol = cfg.tolerance if next(model.parameters()).dtype == torch.float32 else max(cfg.tolerance, 0.1)
    if not err <= tol:
        _restore(model, saved, tie_before)
        raise UnsupportedError(f"rotating model type '{model_type(model)}' changed its output (max |Δ log-prob| "
                               f"{err:.2e} > {tol:g}): its blocks do something the family file does not describe; "
                               "the model was left as it was")
    return {**stats, "max_logprob_change": float(f"{err:.3g}")}


def _restore(model, saved: dict, tie_before: tuple) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied, keys = tie_before
    if tied and not shares_embedding(model, head):
        head.weight = emb.weight
        for c in (model.config, text_config(model.config)):
            c.tie_word_embeddings = True
        if isinstance(keys, dict):
            model.all_tied_weights_keys = keys
    model.load_state_dict(saved, strict=False)
