"""What structured pruning removes, decided before any weight changes: its typed options, the FFN width per layer (uniform, or
global by measured cost), the key/value or query heads kept, the refit target; and, after the blocks are cut, the
config's new sizes. structured.py carries the plan out block by block."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .. import families
from ..errors import UnsupportedError
from ..families.layer_sizes import set_layer_sizes
from .allocation import global_widths, output_fisher
from .registry import CalibrationOptions, StepContext


class StructuredConfig(CalibrationOptions):
    ffn: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of FFN intermediate channels to remove
    heads: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of key/value heads (with their query heads) to remove
    # grouped-query attention: fraction of the query heads of every key/value group to remove (the same number
    # from each group, which heads chosen by OBS on o_proj per layer; keys and values stay); plain transformers reloads it
    query_heads: float = Field(default=0.0, ge=0.0, lt=1.0)
    # keep the intermediate width a multiple of this; default 1 (uniform) or 32 (global: every layer's width
    # then suits int4 groups of 32 and the fused kernels when a quantization step follows)
    multiple_of: Optional[int] = Field(default=None, ge=1, le=1024)
    # choose what to remove by least output error and refit down_proj/o_proj on calibration inputs
    # (ZipLM/SlimGPT-style OBS, FLAP bias compensation); false: score ‖x_j‖·‖W[:, j]‖ and slice
    reconstruct: bool = True
    dampening: float = Field(default=0.01, gt=0.0, le=1.0)  # of mean(diag H), for the refit
    # uniform: every layer loses the same share (plain transformers reloads it); global: one FFN budget
    # shared by all layers by measured cost (a calibration pass first); per-layer widths are stored in
    # the config's slimctl_layer_sizes and reloaded by slimctl (plain from_pretrained refuses the shapes)
    allocation: Literal["uniform", "global"] = "uniform"
    max_layer_share: float = Field(default=0.9, gt=0.0, lt=1.0)  # global: at most this share of a layer's channels
    # what the FFN refit reproduces: "layer", down_proj's own output on its (already pruned upstream)
    # inputs; "model", the unpruned model's block output on the same text, so the kept channels also
    # absorb the drift earlier pruning caused (Kwon et al. 2022's mask-tuning target; one more block pass).
    # Default: model with global allocation, layer with uniform (measured on smollm2-135m, 25 % of FFN:
    # global x1.280 -> x1.234 BBC with model; uniform x1.331 with layer, x1.442 with model at dampening 0.1)
    refit_target: Optional[Literal["layer", "model"]] = None
    # global: reach the FFN budget in this many shots, each re-measuring the Fisher and the OBS costs on the model
    # pruned so far (and, with refit_target model, refitting to the model as that round found it): gradual
    # pruning, as ZipLM's and LLM-Surgeon's multi-shot schedules. Costs one global pass per round
    rounds: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _something(self):
        if self.ffn == 0 and self.heads == 0 and self.query_heads == 0:
            raise ValueError("set ffn, heads and/or query_heads to the fraction to remove, e.g. ffn: 0.25")
        if self.heads and self.query_heads:
            raise ValueError("set heads (whole key/value groups) or query_heads (within each group), not both")
        if self.rounds > 1 and (self.allocation != "global" or self.heads or self.query_heads or not self.ffn):
            raise ValueError("rounds splits a global FFN budget: set allocation: global and ffn, and prune heads "
                             "in a step of their own")
        return self


def family_name(model) -> str:
    fam = families.of(model)
    return f"family '{fam.name}'" if fam else f"model type '{families.model_type(model)}' (no family file)"


def _ffn_plan(cfg: StructuredConfig, model, ffns: list, ctx: StepContext) -> tuple[list[int], list[int]]:
    """(each layer's FFN width now, the channels each keeps when every layer loses cfg.ffn of its own), rounded to
    cfg.multiple_of. The widths may already differ (a model pruned before with allocation global)."""
    if not all(ffns):
        fam = families.of(model)
        what = ("its FFN is made of experts (per-expert widths are not pruned yet)" if fam and fam.experts
                else "its family file declares no FFN producer/consumer Linears")
        raise UnsupportedError(f"FFN pruning is not available for {family_name(model)}: {what}")
    widths = [f[1].in_features for f in ffns]
    mult = multiple(cfg)
    keep = [min(w, max(mult, k - k % mult)) for w, k in ((w, w - int(round(cfg.ffn * w))) for w in widths)]
    if keep == widths:
        ctx.notes.append(f"ffn {cfg.ffn} of {max(widths)} channels rounds to nothing to remove")
    return widths, keep


def refit_target(cfg: StructuredConfig) -> str:
    return cfg.refit_target or ("model" if cfg.allocation == "global" else "layer")


def multiple(cfg: StructuredConfig) -> int:
    return cfg.multiple_of or (32 if cfg.allocation == "global" else 1)


def _heads_plan(cfg: StructuredConfig, model, atts: list, ctx: StepContext) -> tuple[int, int, int, int] | None:
    """(query heads, key/value heads, head size, key/value heads kept); None when heads stay (noted)."""
    why = (f"head pruning needs separate q/k/v/o projections and a config that states the head size; "
           f"{family_name(model)} has not both")
    if not all(atts):
        if not cfg.ffn:
            raise UnsupportedError(why + "; prune ffn instead")
        ctx.notes.append(why + ": heads left as they are, FFN channels pruned")
        return None
    n_heads, n_kv, head_dim = families.head_counts(model.config)
    keep_kv = n_kv - int(round(cfg.heads * n_kv))
    if keep_kv < 1:
        raise UnsupportedError(f"heads {cfg.heads} would remove all {n_kv} key/value heads")
    if keep_kv == n_kv:
        ctx.notes.append(f"heads {cfg.heads} of {n_kv} key/value heads rounds to nothing to remove")
    elif abs((n_kv - keep_kv) / n_kv - cfg.heads) > 1e-9:
        ctx.notes.append(f"heads {cfg.heads}: removed {n_kv - keep_kv} of {n_kv} key/value heads per layer "
                         f"({(n_kv - keep_kv) / n_kv:.0%}) with their query heads; heads go in whole groups")
    return n_heads, n_kv, head_dim, keep_kv


def _query_plan(cfg: StructuredConfig, model, atts: list, ctx: StepContext) -> tuple[int, int, int, int] | None:
    """(query heads, key/value heads, head size, query heads kept per key/value group); None when nothing goes."""
    if not all(atts):
        raise UnsupportedError(f"query-head pruning needs separate q/k/v/o projections and a config that states "
                               f"the head size; {family_name(model)} has not both")
    n_heads, n_kv, head_dim = families.head_counts(model.config)
    group = n_heads // n_kv
    if group < 2:
        raise UnsupportedError(f"query_heads needs grouped-query attention (several query heads per key/value head); "
                               f"this model has {n_heads} query and {n_kv} key/value heads: use heads instead")
    keep = group - int(round(cfg.query_heads * group))
    if keep < 1:
        raise UnsupportedError(f"query_heads {cfg.query_heads} would remove all {group} query heads of each key/value group")
    if keep == group:
        ctx.notes.append(f"query_heads {cfg.query_heads} of {group} query heads per group rounds to nothing to remove")
        return None
    if abs((group - keep) / group - cfg.query_heads) > 1e-9:
        ctx.notes.append(f"query_heads {cfg.query_heads}: removed {group - keep} of the {group} query heads of every "
                         f"key/value group ({(group - keep) / group:.0%})")
    return n_heads, n_kv, head_dim, keep


def update_config(model, plan: dict) -> dict:
    """The config's new sizes; returns the old ones."""
    conf, before = model.config, {}
    if "ffn" in plan:
        key, widths = families.of(model).ffn.size_key, plan["ffn"][1]
        before[key] = getattr(conf, key, None)
        setattr(conf, key, max(widths))
        set_layer_sizes(conf, key, widths if len(set(widths)) > 1 else None)
    if "query_heads" in plan:
        n_heads, n_kv, hd, keep = plan["query_heads"]
        before.update(num_attention_heads=n_heads)
        conf.head_dim = hd
        conf.num_attention_heads = keep * n_kv
    if "heads" in plan:
        n_heads, n_kv, hd, keep_kv = plan["heads"]
        before.update(num_attention_heads=n_heads, num_key_value_heads=n_kv)
        conf.head_dim = hd  # explicit now: hidden_size / heads no longer gives it
        conf.num_attention_heads = keep_kv * (n_heads // n_kv)
        conf.num_key_value_heads = keep_kv
    return before


def round_marks(cfg: StructuredConfig, model, ffns: list, ctx: StepContext) -> list[int | None]:
    """The FFN channels removed in all by the end of each round; [None] for one round. Each round removes what its
    mark asks beyond what earlier rounds took (their widths are rounded to multiple_of)."""
    if cfg.rounds == 1:
        return [None]
    widths, keep = _ffn_plan(cfg, model, ffns, ctx)
    total = sum(widths) - sum(keep)
    return [round(total * (r + 1) / cfg.rounds) for r in range(cfg.rounds)]


def make_plan(cfg: StructuredConfig, model, ffns: list, atts: list, batches: list, ctx: StepContext,
              budget: int | None = None, origin: list[int] | None = None) -> dict:
    """{"ffn": (per-layer widths now, per-layer widths kept), "heads": ..., "query_heads": ...}: what each block
    loses; `budget`: this many FFN channels in all (a round of a global allocation), not cfg.ffn of them;
    `origin`: the widths when the step began (max_layer_share counts from them across rounds)."""
    plan: dict = {}
    if cfg.ffn:
        widths, keep = _ffn_plan(cfg, model, ffns, ctx)
        if cfg.allocation == "global" and (keep != widths or budget):
            keep = _global_widths(cfg, model, ffns, batches, widths, budget or sum(widths) - sum(keep), ctx,
                                  origin or widths)
        plan["ffn"] = (widths, keep)
    heads = _heads_plan(cfg, model, atts, ctx) if cfg.heads else None
    if heads:
        plan["heads"] = heads
    query = _query_plan(cfg, model, atts, ctx) if cfg.query_heads else None
    if query:
        plan["query_heads"] = query
    return plan


def _global_widths(cfg: StructuredConfig, model, ffns: list, batches: list, widths: list[int], budget: int,
                   ctx: StepContext, origin: list[int]) -> list[int]:
    """One FFN budget (`budget` channels in all) spent where the Fisher-weighted OBS cost of losing channels is least."""
    ctx.progress("structured: Fisher of the loss w.r.t. each block's output")
    fisher = output_fisher(model, batches, ctx.track)
    ctx.progress("structured: measuring each layer's cost of losing FFN channels")
    caps = [max(0, min(w - multiple(cfg), int(cfg.max_layer_share * o) - (o - w))) for w, o in zip(widths, origin)]
    widths = global_widths(model, batches, [f[1] for f in ffns], budget, fisher, caps, cfg.dampening, multiple(cfg),
                           ctx.track)
    if len(set(widths)) > 1:  # one note for the widths the model ends with, not one per round (rounds: 16 gave 16)
        ctx.notes[:] = [n for n in ctx.notes if not n.startswith(_WIDTHS_NOTE)] + [
            f"{_WIDTHS_NOTE} {min(widths)}-{max(widths)} (config.json slimctl_layer_sizes): slimctl reloads this artifact "
            "and GGUF export writes a Llama-layout one as llama.cpp's deci; plain from_pretrained refuses its shapes"]
    return widths


_WIDTHS_NOTE = "structured: per-layer FFN widths"
