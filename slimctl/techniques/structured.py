"""Structured pruning: remove whole FFN channels and attention heads (key/value heads together with
their query group, or query heads within every group), slicing the weights and updating the config so
plain `from_pretrained` loads the smaller model. By default the channels/heads are chosen and the consumer Linear (down_proj, o_proj)
refit in closed form on calibration inputs (reconstruct.py: OBS over column groups, bias compensation);
`reconstruct: false` keeps the plain ‖x‖·‖w‖ score and slice; with `refit_target: model` the FFN refit
reproduces the unpruned model's block outputs. Uniform widths reload in plain transformers; global
(per-layer) widths are stored in the config and reloaded by slimctl."""
from __future__ import annotations

import torch
from torch import nn

from .calibrate import block_stats, run_block, sequential, summary
from .hessian import collect
from ..stream.blocks import find_blocks, with_hidden
from .. import families
from ..errors import UnsupportedError
from ..kinds import CAUSAL_LM
from .registry import Proposal, StepContext, register
from .reconstruct import remove_groups
from .structured_plan import StructuredConfig, make_plan, refit_target, round_marks, update_config


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


def _choose(consumer: nn.Linear, groups: torch.Tensor, keep: int, stats, key: str, cfg: StructuredConfig,
            drift: tuple[torch.Tensor, torch.Tensor] | None = None, sets: int = 1) -> tuple[torch.Tensor, float | None]:
    """The column groups of `consumer` to keep (ascending); with reconstruct the consumer's weight and
    bias are refit in place on the kept columns first. `sets` > 1: the groups form that many equal
    consecutive sets (query heads by key/value group) and each keeps the same number. Returns (kept,
    relative output error or None)."""
    per_set = len(groups) // sets
    if not cfg.reconstruct:
        score = _channel_score(consumer, stats.sq_norm[key])[groups].sum(1).view(sets, per_set)
        top = torch.topk(score, keep // sets, dim=1).indices.sort(1).values
        return (top + torch.arange(sets)[:, None] * per_set).flatten(), None
    n = max(stats.n[key], 1)
    cross, cross_sum = drift or (None, None)
    quota = dict(labels=torch.arange(len(groups)) // per_set, quota=per_set - keep // sets) if sets > 1 else {}
    r = remove_groups(consumer.weight, stats.hessian[key], groups, len(groups) - keep, cfg.dampening,
                      consumer.bias, stats.sum[key] / n, cross=cross, cross_sum=cross_sum, **quota)
    with torch.no_grad():
        consumer.weight[:, groups[r.kept].flatten()] = r.weight.to(consumer.weight.dtype)
        if r.bias is not None:
            consumer.bias.copy_(r.bias.to(consumer.bias.dtype))
    return r.kept, r.error


def _prune_ffn(block, ffn, keep: int, stats, cfg: StructuredConfig, drift=None) -> float | None:
    producers, consumer, pnames, cname, parts = ffn
    width = consumer.in_features
    idx, err = _choose(consumer, torch.arange(width)[:, None], keep, stats, "ffn", cfg, drift)
    rows = torch.cat([idx + k * width for k in range(parts)])  # a fused producer: the channel in every part
    for p, pn in zip(producers, pnames):
        _set(block, pn, _keep_rows(p, rows))
    _set(block, cname, _keep_cols(consumer, idx))
    return err


def _prune_heads(block, att: dict[str, str], heads: tuple[int, int, int, int], stats, cfg: StructuredConfig) -> tuple[list[int], float | None]:
    """Keep the key/value heads (with their query groups) whose o_proj inputs matter most; returns the removed ones."""
    n_heads, n_kv, hd, keep_kv = heads
    group = n_heads // n_kv
    cols = torch.arange(n_heads * hd).view(n_kv, group * hd)  # o_proj input = concat of query heads, by kv group
    kv_keep, err = _choose(block.get_submodule(att["o"]), cols, keep_kv, stats, "heads", cfg)
    q_heads = (kv_keep[:, None] * group + torch.arange(group)[None, :]).flatten()
    q_idx = (q_heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    kv_idx = (kv_keep[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    for part, idx in (("q", q_idx), ("k", kv_idx), ("v", kv_idx)):
        _set(block, att[part], _keep_rows(block.get_submodule(att[part]), idx))
    _set(block, att["o"], _keep_cols(block.get_submodule(att["o"]), q_idx))
    return sorted(set(range(n_kv)) - set(kv_keep.tolist())), err


def _prune_query_heads(block, att: dict[str, str], plan: tuple[int, int, int, int], stats,
                       cfg: StructuredConfig) -> tuple[list[int], float | None]:
    """Remove the same number of query heads from every key/value group, those whose o_proj columns matter
    least (OBS with a per-group quota, o_proj refit); returns the removed query heads."""
    n_heads, n_kv, hd, keep = plan
    o = block.get_submodule(att["o"])
    cols = torch.arange(n_heads * hd).view(n_heads, hd)
    kept, err = _choose(o, cols, keep * n_kv, stats, "heads", cfg, sets=n_kv)
    q_idx = cols[kept].flatten()
    _set(block, att["q"], _keep_rows(block.get_submodule(att["q"]), q_idx))
    _set(block, att["o"], _keep_cols(o, q_idx))
    _set_group_size(block.get_submodule(att["q"].rpartition(".")[0]), keep, n_kv)
    return sorted(set(range(n_heads)) - set(kept.tolist())), err


def _set_group_size(attention: nn.Module, per_group: int, n_kv: int) -> None:
    """The attention module's own head counts (set from the config when it was built) after query heads went."""
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = per_group
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, per_group * n_kv)


def ffn_stats_and_drift(block: nn.Module, inputs: list, consumer: nn.Linear, target: list[torch.Tensor]):
    """The consumer's input statistics (with H) and, in the same pass, (2/n Σ δ xᵀ, 2/n Σ δ) over the
    calibration tokens: x the consumer's input, δ = target − the block's output (n tokens, H's normalisation)."""
    seen: list[torch.Tensor] = []
    acc: dict = {}

    def run():
        acc.update(cross=None, total=None, n=0)
        h = consumer.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
        try:
            with torch.inference_mode():
                for (a, k), t in zip(inputs, target):
                    d = (t - run_block(block, a, k)).reshape(-1, t.shape[-1]).float()
                    x = seen.pop().reshape(-1, consumer.in_features).float()
                    acc["cross"] = d.T @ x if acc["cross"] is None else acc["cross"].addmm_(d.T, x)
                    acc["total"] = d.sum(0) if acc["total"] is None else acc["total"] + d.sum(0)
                    acc["n"] += d.shape[0]
        finally:
            h.remove()

    stats = collect({"ffn": consumer}, run, hessian=True)
    scale = 2.0 / max(acc["n"], 1)
    return stats, (acc["cross"].double() * scale, acc["total"].double() * scale)


def _dense_outputs(block: nn.Module, inputs: list, dense: list[torch.Tensor]) -> list[torch.Tensor]:
    """The unpruned block's outputs on the unpruned model's hidden states (the refit's target)."""
    with torch.inference_mode():
        return [run_block(block, *with_hidden(a, k, h)) for (a, k), h in zip(inputs, dense)]


def _runs(model, batch: dict) -> None:
    """One forward pass of the pruned model (a streamed one block at a time)."""
    from ..stream.skeleton import stream_of

    if stream_of(model):
        from ..evaluate.streamed import forward_logits

        forward_logits(model, [batch])
        return
    with torch.inference_mode():
        model(**batch)


def _record(rec: dict, key: str, err: float | None) -> None:
    if err is not None:
        rec[key] = round(err, 6)


@register("structured", "prune", StructuredConfig,
          "remove FFN channels and attention heads (GQA-aware), consumers refit by least squares (OBS); uniform reloads with plain transformers, global (per-layer widths) with slimctl",
          proposals=(Proposal("structured-ffn-25", {"ffn": 0.25}, order=70),
                     Proposal("structured-ffn-25-global", {"ffn": 0.25, "allocation": "global"}, (CAUSAL_LM,), order=80)),
          streams=True)
def apply(model, cfg: StructuredConfig, ctx: StepContext) -> dict:
    conf = model.config
    params_before = sum(p.numel() for p in model.parameters())
    if cfg.allocation == "global" and (ctx.kind != CAUSAL_LM or not cfg.reconstruct):
        raise UnsupportedError("allocation global weighs errors by the next-token loss: causal language models, with reconstruct on")
    batches = cfg.batches(ctx)
    removed: dict[str, dict] = {}
    before: dict | None = None
    plan: dict = {}
    origin = _ffn_widths(model)
    marks = round_marks(cfg, model, [_ffn(model, b) for b in find_blocks(model)[1]], ctx)
    for r, mark in enumerate(marks):
        budget = None if mark is None else mark - (sum(origin) - sum(_ffn_widths(model)))
        if budget is not None and budget <= 0:
            continue
        if len(marks) > 1:
            ctx.progress(f"structured: round {r + 1} of {len(marks)} ({budget} FFN channels)")
        plan = _prune_round(model, cfg, ctx, batches, budget, removed, origin)
        got = update_config(model, plan)
        before = before if before is not None else got
    before = before or {}
    try:  # an architecture that reads head counts from elsewhere fails here, not in a user's hands
        _runs(model, batches[0])
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"the structurally pruned model does not run ({type(e).__name__}: {e}); "
                               "this architecture is not supported for structured pruning") from None
    params_after = sum(p.numel() for p in model.parameters())
    after = {k: getattr(conf, k) for k in before}
    return {"layers": removed, "config_before": before, "config_after": after, "params_before": params_before,
            **({"ffn_widths": plan["ffn"][1]} if "ffn" in plan else {}),
            **({"rounds": len(marks)} if len(marks) > 1 else {}),
            "params_after": params_after, "params_removed_fraction": 1 - params_after / params_before,
            **({"refit_target": refit_target(cfg)} if cfg.reconstruct and "ffn" in plan else {}),
            "calibration": summary(batches)}


def _ffn_widths(model) -> list[int]:
    """Each block's FFN width now (0 where its family declares no FFN)."""
    ffns = [_ffn(model, b) for b in find_blocks(model)[1]]
    return [f[1].in_features if f else 0 for f in ffns]


def _prune_round(model, cfg: StructuredConfig, ctx: StepContext, batches: list, budget: int | None,
                 removed: dict[str, dict], origin: list[int]) -> dict:
    """Plan (global: re-measured on the model as it is now) and prune every block once; returns the plan."""
    blocks = find_blocks(model)[1]
    ffns, atts = [_ffn(model, b) for b in blocks], [_attn(model, b) for b in blocks]
    plan = make_plan(cfg, model, ffns, atts, batches, ctx, budget, origin)
    sequential(model, batches, _BlockPruner(cfg, plan, ffns, atts, removed), ctx.track)
    return plan


class _BlockPruner:
    """The per-block driver `sequential` calls: heads first (the FFN then sees their refit output), then the FFN,
    refit to the layer's own output or (refit_target model) to the block's output before this round pruned it."""

    def __init__(self, cfg: StructuredConfig, plan: dict, ffns: list, atts: list, removed: dict[str, dict]):
        self.cfg, self.plan, self.ffns, self.atts, self.removed = cfg, plan, ffns, atts, removed
        self.dense: list[torch.Tensor] = []  # refit_target model: the unpruned model's hidden states, per input

    def __call__(self, i: int, name: str, block: nn.Module, inputs: list) -> None:
        cfg, plan = self.cfg, self.plan
        rec = self.removed.setdefault(name, {})
        if refit_target(cfg) == "model" and cfg.reconstruct and "ffn" in plan:
            if not self.dense:
                self.dense.extend((a[0] if a else k["hidden_states"]) for a, k in inputs)
            self.dense[:] = _dense_outputs(block, inputs, self.dense)
        pruning_kv = "heads" in plan and plan["heads"][3] < plan["heads"][1]
        if pruning_kv or "query_heads" in plan:
            stats = block_stats(block, inputs, {"heads": block.get_submodule(self.atts[i]["o"])}, hessian=cfg.reconstruct)
            if pruning_kv:
                rec["kv_heads_removed"], err = _prune_heads(block, self.atts[i], plan["heads"], stats, cfg)
            else:
                rec["query_heads_removed"], err = _prune_query_heads(block, self.atts[i], plan["query_heads"], stats, cfg)
            _record(rec, "o_proj_error", err)
        if "ffn" in plan and plan["ffn"][1][i] < plan["ffn"][0][i]:
            self._ffn(i, block, inputs, rec)

    def _ffn(self, i: int, block: nn.Module, inputs: list, rec: dict) -> None:
        consumer, (now, keep) = self.ffns[i][1], self.plan["ffn"]
        if self.dense:
            stats, drift = ffn_stats_and_drift(block, inputs, consumer, self.dense)
        else:
            stats, drift = block_stats(block, inputs, {"ffn": consumer}, hessian=self.cfg.reconstruct), None
        _record(rec, "ffn_error", _prune_ffn(block, self.ffns[i], keep[i], stats, self.cfg, drift))
        rec["ffn_channels_removed"] = rec.get("ffn_channels_removed", 0) + now[i] - keep[i]
