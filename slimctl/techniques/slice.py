"""Slice: remove dimensions of the residual stream (hidden size), as SliceGPT does (Ashkboos et al. 2024):
rotate the residual stream onto the principal components of its normalised activations on calibration text,
then delete the least of them from the embedding, every Linear that reads or writes the stream and the LM head.
Unlike SliceGPT, one rotation serves every block (SliceGPT gives each block its own and adds a matrix on every
residual connection), so the result stays an ordinary checkpoint with a smaller hidden_size that plain
`from_pretrained` reloads.

Steps: rotate.py fuses each RMSNorm's scale into its readers and folds Q into the weights; then the last
columns/rows go. Each RMSNorm then averages over fewer dimensions and sees a little less energy, so its
weight becomes the scalar that keeps its output's scale (√(d/k) times the kept share of the norm, measured).
A tied LM head cannot take the final norm's per-channel scale in a rotated basis: with `basis: pca` it is untied
(as rotate does, said in a note); `basis: channels` keeps the original axes and drops whole channels instead
(Minitron's embedding-channel pruning), so the head stays tied and the scale is sliced with its channels."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import UnsupportedError
from ..families import model_type, require, text_config
from ..families.folding import block_folds
from ..kinds import CAUSAL_LM
from ..stream.blocks import find_blocks, forward_all
from .calibrate import summary
from .registry import CalibrationOptions, StepContext, register
from .tying import shares_embedding
from .rotate import check_batch, final_norm, logprobs, norm_scale, residual_roles, rotate_residual


class SliceConfig(CalibrationOptions):
    fraction: float = Field(gt=0.0, lt=1.0)  # share of the hidden size to remove (rounded, see multiple_of)
    multiple_of: int = Field(default=32, ge=1, le=1024)  # the kept width is a multiple of this (int4 groups of 32)
    calib_samples: int = Field(default=32, ge=1, le=100_000)  # one forward each; the PCA needs tokens >> hidden
    # pca: rotate onto the principal axes first (SliceGPT); a tied LM head is untied when the final norm's scale has
    # to move into it (more parameters, said in a note). channels: keep the original axes and drop the least
    # important channels (Minitron's embedding-channel pruning); a tied head stays tied
    basis: Literal["pca", "channels"] = "pca"


def kept_width(config, cfg: SliceConfig) -> int:
    """The kept hidden size: a multiple of `multiple_of` and of the number of attention heads (transformers'
    configs require hidden_size % num_attention_heads == 0 even where head_dim is given)."""
    hidden, heads = config.hidden_size, getattr(config, "num_attention_heads", 1) or 1
    step = math.lcm(cfg.multiple_of, heads)
    k = int(round(hidden * (1 - cfg.fraction) / step)) * step
    if k < step or k >= hidden:
        raise UnsupportedError(f"fraction {cfg.fraction} of hidden size {hidden} keeps {k} dimensions in steps of {step} "
                               f"(a multiple of multiple_of {cfg.multiple_of} and of the {heads} attention heads): pick a "
                               "fraction that removes some and keeps some, or a smaller multiple_of")
    return k


class _Site:
    """One RMSNorm's inputs, normalised (x̂ = x / rms(x)): their second moment."""

    def __init__(self):
        self.cov, self.n = None, 0

    def hook(self, mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
        self.cov = xh.T @ xh if self.cov is None else self.cov + xh.T @ xh
        self.n += xh.shape[0]


def _collect(model, norms: list[nn.Module], final: nn.Module, batches: list[dict]) -> tuple[list[_Site], _Site]:
    sites = [_Site() for _ in norms]
    last = _Site()
    hooks = [n.register_forward_pre_hook(s.hook) for n, s in zip(norms, sites)] + [final.register_forward_pre_hook(last.hook)]
    try:
        forward_all(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return sites, last


def principal_axes(sites: list[_Site]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (columns = eigenvectors, largest first) of the sites' mean normalised covariance, and its eigenvalues."""
    c = sum(s.cov / s.n for s in sites) / len(sites)
    vals, vecs = torch.linalg.eigh(c)
    return vecs.flip(-1), vals.flip(-1)


def channel_order(sites: list[_Site], scales: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation Q (channels by importance, largest first) and the importances: each channel's mean energy at
    the norms' outputs, x̂ᵢ² times the norm's scale squared (Minitron's activation score for embedding channels)."""
    imp = sum(torch.diagonal(s.cov) / s.n * w.pow(2) for s, w in zip(sites, scales)) / len(sites)
    order = torch.argsort(imp, descending=True)
    q = torch.zeros(imp.numel(), imp.numel(), dtype=torch.float64)
    q[order, torch.arange(imp.numel())] = 1.0
    return q, imp[order]


def _norm_gain(site: _Site, q: torch.Tensor, k: int) -> float:
    """√(d/k) · √(kept share of x̂'s energy): the scalar that keeps an RMSNorm's output scale after slicing."""
    energy = torch.diagonal(q.T @ site.cov @ q)
    return float((energy.numel() / k * energy[:k].sum() / energy.sum()).sqrt())


def _shrink_linear(lin: nn.Linear, rows: int | None = None, cols: int | None = None) -> None:
    with torch.no_grad():
        w = lin.weight[:rows if rows else None, :cols if cols else None].clone()
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        if rows and lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias[:rows].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def _set_norm(norm: nn.Module, k: int, value: float) -> None:
    norm.weight = nn.Parameter(torch.full((k,), value, dtype=norm.weight.dtype), requires_grad=norm.weight.requires_grad)


def _slice(model, resolved: list, gains: list[float], final: nn.Module, final_weight: torch.Tensor, k: int) -> None:
    """Cut every reader's columns, writer's rows, the embedding and the head to the first k rotated dimensions."""
    offset = require(model, "slice").norm_offset
    it = iter(gains)
    for reading, writers, _ in resolved:
        for norm, off, readers in reading:
            _set_norm(norm, k, next(it) - off)
            for lin in readers:
                _shrink_linear(lin, cols=k)
        for lin in writers:
            _shrink_linear(lin, rows=k)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = shares_embedding(model, head)
    with torch.no_grad():
        emb.weight = nn.Parameter(emb.weight[:, :k].clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = k
    if tied:
        head.weight = emb.weight
    else:
        _shrink_linear(head, cols=k)
    final.weight = nn.Parameter((final_weight - offset).to(final.weight.dtype), requires_grad=final.weight.requires_grad)


EPS_KEYS = ("rms_norm_eps", "variance_epsilon", "eps")  # config keys and RMSNorm attributes holding ε


def _update_config(model, norms: list[nn.Module], k: int) -> dict:
    """hidden_size k, head_dim kept, and ε scaled by d/k in the config and every sliced norm: √(Σx²/k + ε·d/k) is
    √(d/k)·√(Σx²/d + ε), so with the norm's gain of √(d/k) the sliced norm is exact where no energy was cut."""
    c = text_config(model.config)
    d = c.hidden_size
    before = {"hidden_size": d, "head_dim": getattr(c, "head_dim", None)}
    if getattr(c, "head_dim", None) is None:
        c.head_dim = d // c.num_attention_heads
    c.hidden_size = k
    for obj in (c, *norms):
        for key in EPS_KEYS:
            if isinstance(getattr(obj, key, None), float):
                setattr(obj, key, getattr(obj, key) * d / k)
    return before


def _check_layout(model, kind: str) -> None:
    from ..families.layer_sizes import as_slimctl_loads
    from ..kinds import reload_mismatch

    odd = reload_mismatch(model, kind, as_slimctl_loads)
    if odd:
        raise UnsupportedError(f"model type '{model_type(model)}' would reload with other shapes after slicing ({odd}): "
                               "its config does not describe a narrower residual stream")


def _refuse_unsupported(model, ctx: StepContext) -> None:
    from ..stream.skeleton import refuse, stream_of

    if ctx.kind != CAUSAL_LM:
        raise UnsupportedError(f"slice handles causal LMs (decoder blocks with RMSNorm); this model is a {ctx.kind}")
    if stream_of(model):
        refuse("slice (one rotation is computed from every block's activations)")
    fam = require(model, "slice")
    if fam.experts:
        raise UnsupportedError(f"slice does not handle mixture-of-experts blocks yet (family '{fam.name}': its router and "
                               "experts read and write the residual stream); slice refused")
    if fam.norm_offset:
        raise UnsupportedError(f"model type '{model_type(model)}' scales its embedding by √hidden_size (Gemma): a narrower "
                               "hidden size would change that factor; slice refused")
    if fam.attention is None or not fam.attention.resizable:
        raise UnsupportedError(f"model type '{model_type(model)}' derives the head size from hidden_size: a narrower "
                               "residual stream would change the heads; slice refused")


def _sliced(model, cfg: SliceConfig, ctx: StepContext) -> dict:
    c = text_config(model.config)
    d, k = c.hidden_size, kept_width(c, cfg)
    prefix, blocks = find_blocks(model)
    resolved = [residual_roles(b, block_folds(model, b)[0], d, f"{prefix}.{i}") for i, b in enumerate(blocks)]
    final = final_norm(model, prefix)
    norms = [n for reading, _, _ in resolved for n, _, _ in reading]
    batches = cfg.batches(ctx)
    ctx.progress(f"slice: principal axes of the residual stream at {len(norms) + 1} norms")
    sites, last = _collect(model, norms, final, batches)
    offset = require(model, "slice").norm_offset
    scale = norm_scale(final, offset)
    if cfg.basis == "pca":
        q, vals = principal_axes(sites + [last])
    else:
        q, vals = channel_order(sites + [last], [norm_scale(n, offset) for n in norms] + [scale])
    tied = rotate_residual(model, prefix, resolved, q, ctx, untie=cfg.basis == "pca")
    # a head still tied reads the final norm unfused: its scale moves with its channel (a permutation) or is uniform
    kept_scale = (q.T @ scale if cfg.basis == "channels" else scale)[:k] if tied else torch.ones(k, dtype=torch.float64)
    final_weight = kept_scale * _norm_gain(last, q, k)
    gains = [_norm_gain(s, q, k) for s in sites]
    _slice(model, resolved, gains, final, final_weight, k)
    before = _update_config(model, [*norms, final], k)
    return {"hidden_before": d, "hidden_after": k, "kept_energy": round(float(vals[:k].sum() / vals.sum()), 5),
            "basis": cfg.basis, "tied_head": tied, "config_before": before,
            "calibration": summary(batches)}


@register("slice", "prune", SliceConfig,
          "remove residual-stream dimensions (SliceGPT with one PCA rotation for every block): a smaller hidden_size, "
          "plain transformers reloads it")
def apply(model, cfg: SliceConfig, ctx: StepContext) -> dict:
    """Refusals come before any weight changes; the model on disk is never touched."""
    _refuse_unsupported(model, ctx)
    batch = check_batch(model, ctx)
    before = logprobs(model, batch)
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        stats = _sliced(model, cfg, ctx)
    _check_layout(model, ctx.kind)
    after = logprobs(model, batch)
    params_after = sum(p.numel() for p in model.parameters())
    return {**stats, "check_kl": round(float((before.exp() * (before - after)).sum(-1).mean()), 5),
            "params_before": params_before, "params_after": params_after,
            "params_removed_fraction": 1 - params_after / params_before}
