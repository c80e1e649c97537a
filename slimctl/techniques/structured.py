"""Structured pruning: remove whole FFN channels and attention heads (key/value heads together with
their query group) by a calibration importance score, slicing the weights and updating the config so
plain `from_pretrained` loads the smaller model. Uniform per layer: HF configs describe one size."""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from ..calibrate import block_stats, find_blocks, sequential, summary
from .. import families
from ..errors import UnsupportedError
from . import CalibrationOptions, StepContext, register


class StructuredConfig(CalibrationOptions):
    ffn: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of FFN intermediate channels to remove
    heads: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of key/value heads (with their query heads) to remove
    multiple_of: int = Field(default=1, ge=1, le=1024)  # keep the intermediate width a multiple of this

    @model_validator(mode="after")
    def _something(self):
        if self.ffn == 0 and self.heads == 0:
            raise ValueError("set ffn and/or heads to the fraction to remove, e.g. ffn: 0.25")
        return self


def _ffn(model, block: nn.Module) -> tuple[list[nn.Linear], nn.Linear, list[str], str, int] | None:
    """(producers whose output rows are the channels, consumer whose input columns are), names: from the
    model's family file."""
    fam = families.of(model)
    if fam is None or fam.ffn is None or not all(_linear_at(block, n) for n in (*fam.ffn.producers, fam.ffn.consumer)):
        return None
    return ([block.get_submodule(n) for n in fam.ffn.producers], block.get_submodule(fam.ffn.consumer),
            list(fam.ffn.producers), fam.ffn.consumer, fam.ffn.parts)


def _attn(model, block: nn.Module) -> dict[str, str] | None:
    """The block's q/k/v/o paths when its family declares separate projections."""
    fam = families.of(model)
    a = fam.attention if fam else None
    if a is None or not a.resizable or not all(_linear_at(block, n) for n in (a.q, a.k, a.v, a.o)):
        return None
    return {"q": a.q, "k": a.k, "v": a.v, "o": a.o}


def _linear_at(block: nn.Module, path: str) -> bool:
    try:
        return type(block.get_submodule(path)) is nn.Linear
    except AttributeError:
        return False


def _family_name(model) -> str:
    fam = families.of(model)
    return f"family '{fam.name}'" if fam else f"model type '{families.model_type(model)}' (no family file)"


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight[idx])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[idx])
    return new


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, idx])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def _set(block: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, mod)


def _channel_score(consumer: nn.Linear, sq_norm: torch.Tensor) -> torch.Tensor:
    """Expected size of each input channel's contribution: ‖X_j‖₂ · ‖W[:, j]‖₂ (Wanda, per column)."""
    return sq_norm.sqrt() * consumer.weight.detach().float().norm(dim=0)


def _ffn_plan(cfg: StructuredConfig, model, ffns: list, ctx: StepContext) -> tuple[int, int]:
    """(FFN width, channels kept), rounded to cfg.multiple_of."""
    if not all(ffns):
        fam = families.of(model)
        what = ("its FFN is made of experts (per-expert widths are not pruned yet)" if fam and fam.experts
                else "its family file declares no FFN producer/consumer Linears")
        raise UnsupportedError(f"FFN pruning is not available for {_family_name(model)}: {what}")
    width = ffns[0][1].in_features
    keep = width - int(round(cfg.ffn * width))
    keep = max(cfg.multiple_of, keep - keep % cfg.multiple_of)
    if keep >= width:
        ctx.notes.append(f"ffn {cfg.ffn} of {width} channels rounds to nothing to remove")
    return width, min(keep, width)


def _heads_plan(cfg: StructuredConfig, model, atts: list, ctx: StepContext) -> tuple[int, int, int, int] | None:
    """(query heads, key/value heads, head size, key/value heads kept); None when heads stay (noted)."""
    why = (f"head pruning needs separate q/k/v/o projections and a config that states the head size; "
           f"{_family_name(model)} has not both")
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


def _prune_ffn(block, ffn, keep: int, sq_norm: torch.Tensor) -> None:
    producers, consumer, pnames, cname, parts = ffn
    idx = torch.topk(_channel_score(consumer, sq_norm), keep).indices.sort().values
    width = consumer.in_features
    rows = torch.cat([idx + k * width for k in range(parts)])  # a fused producer: the channel in every part
    for p, pn in zip(producers, pnames):
        _set(block, pn, _keep_rows(p, rows))
    _set(block, cname, _keep_cols(consumer, idx))


def _prune_heads(block, att: dict[str, str], heads: tuple[int, int, int, int], sq_norm: torch.Tensor) -> list[int]:
    """Keep the key/value heads (with their query groups) whose o_proj inputs matter most; returns the removed ones."""
    n_heads, n_kv, hd, keep_kv = heads
    per_col = _channel_score(block.get_submodule(att["o"]), sq_norm)  # o_proj input = concat of query heads
    group = n_heads // n_kv
    kv_keep = torch.topk(per_col.view(n_kv, group * hd).sum(1), keep_kv).indices.sort().values
    q_heads = (kv_keep[:, None] * group + torch.arange(group)[None, :]).flatten()
    q_idx = (q_heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    kv_idx = (kv_keep[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    for part, idx in (("q", q_idx), ("k", kv_idx), ("v", kv_idx)):
        _set(block, att[part], _keep_rows(block.get_submodule(att[part]), idx))
    _set(block, att["o"], _keep_cols(block.get_submodule(att["o"]), q_idx))
    return sorted(set(range(n_kv)) - set(kv_keep.tolist()))


def _update_config(model, plan: dict) -> dict:
    """The config's new sizes; returns the old ones."""
    conf, before = model.config, {}
    if "ffn" in plan:
        key = families.of(model).ffn.size_key
        before[key] = getattr(conf, key, None)
        setattr(conf, key, plan["ffn"][1])
    if "heads" in plan:
        n_heads, n_kv, hd, keep_kv = plan["heads"]
        before.update(num_attention_heads=n_heads, num_key_value_heads=n_kv)
        conf.head_dim = hd  # explicit now: hidden_size / heads no longer gives it
        conf.num_attention_heads = keep_kv * (n_heads // n_kv)
        conf.num_key_value_heads = keep_kv
    return before


@register("structured", "prune", StructuredConfig,
          "remove FFN channels and attention heads (GQA-aware) by calibrated importance; smaller config, reloads with plain transformers")
def apply(model, cfg: StructuredConfig, ctx: StepContext) -> dict:
    conf = model.config
    params_before = sum(p.numel() for p in model.parameters())
    prefix, blocks = find_blocks(model)
    ffns, atts = [_ffn(model, b) for b in blocks], [_attn(model, b) for b in blocks]
    plan: dict = {}
    if cfg.ffn:
        plan["ffn"] = _ffn_plan(cfg, model, ffns, ctx)
    heads = _heads_plan(cfg, model, atts, ctx) if cfg.heads else None
    if heads:
        plan["heads"] = heads
    batches = cfg.batches(ctx)
    removed: dict[str, dict] = {}

    def on_block(i, name, block, inputs):
        consumers = {**({"ffn": ffns[i][1]} if "ffn" in plan else {}), **({"heads": block.get_submodule(atts[i]["o"])} if "heads" in plan else {})}
        stats = block_stats(block, inputs, consumers)
        rec = {}
        if "ffn" in plan and plan["ffn"][1] < plan["ffn"][0]:
            _prune_ffn(block, ffns[i], plan["ffn"][1], stats.sq_norm["ffn"])
            rec["ffn_channels_removed"] = plan["ffn"][0] - plan["ffn"][1]
        if "heads" in plan and plan["heads"][3] < plan["heads"][1]:
            rec["kv_heads_removed"] = _prune_heads(block, atts[i], plan["heads"], stats.sq_norm["heads"])
        removed[name] = rec

    sequential(model, batches, on_block, ctx.track)
    before = _update_config(model, plan)
    try:  # an architecture that reads head counts from elsewhere fails here, not in a user's hands
        with torch.inference_mode():
            model(**batches[0])
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"the structurally pruned model does not run ({type(e).__name__}: {e}); "
                               "this architecture is not supported for structured pruning") from None
    params_after = sum(p.numel() for p in model.parameters())
    after = {k: getattr(conf, k) for k in before}
    return {"layers": removed, "config_before": before, "config_after": after, "params_before": params_before,
            "params_after": params_after, "params_removed_fraction": 1 - params_after / params_before,
            "calibration": summary(batches)}
