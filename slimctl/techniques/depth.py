"""Depth pruning: remove whole blocks (decoder layers) scored on calibration text, by the measured cost of
skipping each one (KL of the model's next-token distribution with the block bypassed, as in Shortened
LLaMA's perplexity criterion) or ShortGPT's block influence (1 − cos between a block's input and output).
The result is a standard config with fewer layers: plain `from_pretrained` reloads it."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from ..stream.blocks import find_blocks, forward_all
from .calibrate import sequential, summary
from ..errors import UnsupportedError
from ..families import model_type
from ..families import convert
from ..families.layer_sizes import as_slimctl_loads, drop_layers
from ..kinds import CAUSAL_LM
from .registry import CalibrationOptions, Proposal, StepContext, register


class DepthConfig(CalibrationOptions):
    blocks: Optional[int] = Field(default=None, ge=1)  # how many blocks to remove
    fraction: Optional[float] = Field(default=None, gt=0.0, lt=1.0)  # or this share of them (rounded)
    score: Literal["skip", "influence"] = "skip"  # skip: KL with the block bypassed; influence: ShortGPT's 1 − cos
    keep_first: int = Field(default=1, ge=0)  # never remove the first N blocks (and the last one)
    calib_samples: int = Field(default=16, ge=1, le=100_000)  # skip scoring runs the model once per block

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.blocks is None) == (self.fraction is None):
            raise ValueError("set exactly one of blocks (a count) or fraction (a share of the blocks) to remove")
        return self


def _count(cfg: DepthConfig, n: int) -> int:
    k = cfg.blocks if cfg.blocks is not None else int(round(cfg.fraction * n))
    allowed = n - cfg.keep_first - 1
    if k < 1:
        raise UnsupportedError(f"fraction {cfg.fraction} of {n} blocks rounds to no block to remove")
    if k > allowed:
        raise UnsupportedError(f"removing {k} of {n} blocks leaves too few: the first {cfg.keep_first} and the last "
                               f"block stay, so at most {allowed} can go")
    return k


def _bypass(block):
    """A forward hook that makes `block` return its own input (the residual stream passes unchanged)."""
    def hook(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    return block.register_forward_hook(hook, with_kwargs=True)


def _outputs(model, batches, causal: bool) -> list[torch.Tensor]:
    """Next-token log-probabilities (causal LM) or the model's first output (encoders, classifiers)."""
    out = []
    with torch.inference_mode():
        for b in batches:
            o = model(**b, use_cache=False) if causal else model(**b)
            out.append(o.logits.float().log_softmax(-1) if causal else o[0].float())
    return out


def _distance(p: torch.Tensor, q: torch.Tensor, causal: bool) -> float:
    if causal:
        return float((p.exp() * (p - q)).sum(-1).mean())  # KL(original ‖ bypassed) per token
    return float(1 - torch.nn.functional.cosine_similarity(p, q, dim=-1).mean())


def skip_costs(model, blocks, batches, track, causal: bool) -> list[float]:
    """Per block: how far the model's output moves on calibration text when that block is bypassed."""
    ref = _outputs(model, batches, causal)
    costs = []
    for i in track(range(len(blocks)), "scoring blocks", len(blocks)):
        h = _bypass(blocks[i])
        try:
            got = _outputs(model, batches, causal)
        finally:
            h.remove()
        costs.append(sum(_distance(p, q, causal) for p, q in zip(ref, got)) / len(ref))
    return costs


def influence(model, batches, track) -> list[float]:
    """ShortGPT's block influence: 1 − mean cosine similarity of each block's input and output tokens."""
    scores = []

    def on_block(i, name, block, inputs):
        from .calibrate import run_block

        cos = []
        with torch.inference_mode():
            for a, k in inputs:
                x = a[0] if a else k["hidden_states"]
                cos.append(float(torch.nn.functional.cosine_similarity(x.float(), run_block(block, a, k).float(), dim=-1).mean()))
        scores.append(1 - sum(cos) / len(cos))

    sequential(model, batches, on_block, track)
    return scores


def remove_blocks(model, drop: list[int]) -> None:
    """Delete blocks `drop`, renumber the layer indices the attention caches use, and shrink every
    per-layer list in the config (layer_types, …)."""
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    for i in sorted(drop, reverse=True):
        del blocks[i]
    convert.drop_blocks(model, prefix, drop)  # GPT-2's Conv1D, fused experts: saved back under their new names
    for new, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    conf = model.config
    for key, value in list(conf.to_dict().items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(conf, key, [v for j, v in enumerate(value) if j not in drop])
    conf.num_hidden_layers = len(blocks)
    drop_layers(conf, drop)  # per-layer FFN widths (an earlier structured step with allocation global)


def _check_layout(model, kind: str) -> None:
    """The smaller config must build the same layers (families that derive a layer's kind from its index,
    e.g. every second layer an MoE, would reload a different model)."""
    from ..kinds import reload_mismatch

    odd = reload_mismatch(model, kind, as_slimctl_loads)
    if odd:
        raise UnsupportedError(f"after removing blocks, model type '{model_type(model)}' would reload with a different "
                               f"layout ({odd}): its config derives layers from their index; depth pruning refused")


@register("depth", "prune", DepthConfig,
          "remove whole blocks by the measured cost of skipping each (or ShortGPT block influence); fewer layers, plain transformers reloads it",
          proposals=(Proposal("depth-12", {"fraction": 0.125}, (CAUSAL_LM,), order=90),))
def apply(model, cfg: DepthConfig, ctx: StepContext) -> dict:
    from ..stream.skeleton import refuse, stream_of

    if stream_of(model):
        refuse("depth pruning (it scores each block on the whole model)")
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    k = _count(cfg, n)
    batches = cfg.batches(ctx)
    params_before = sum(p.numel() for p in model.parameters())
    ctx.progress(f"depth: scoring {n} blocks ({cfg.score})")
    causal = ctx.kind == CAUSAL_LM
    scores = skip_costs(model, blocks, batches, ctx.track, causal) if cfg.score == "skip" else influence(model, batches, ctx.track)
    candidates = [i for i in range(cfg.keep_first, n - 1)]
    drop = sorted(sorted(candidates, key=lambda i: scores[i])[:k])
    remove_blocks(model, drop)
    _check_layout(model, ctx.kind)
    forward_all(model, batches[:1])  # the smaller model runs
    params_after = sum(p.numel() for p in model.parameters())
    return {"blocks_removed": drop, "block_scores": [round(s, 6) for s in scores], "score": cfg.score,
            "config_before": {"num_hidden_layers": n}, "config_after": {"num_hidden_layers": n - k},
            "params_before": params_before, "params_after": params_after,
            "params_removed_fraction": 1 - params_after / params_before, "calibration": summary(batches)}
