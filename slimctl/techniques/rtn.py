"""Weight-only round-to-nearest: int8 or int4, per output channel or in groups, stored packed."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from ..quant.layers import WeightOnlyLinear
from ..stream.skeleton import set_submodule
from ..quant.integer import QScheme, dequantize_groups, rtn
from ..stream.skeleton import refuse, stream_of, visit
from .registry import Proposal, StepContext, WeightOnlyOptions, plan_groups, register, select_linears


class RTNConfig(WeightOnlyOptions):
    """Defaults to int8 per output channel; `bits: 4, group_size: 128` is the usual int4."""

    bits: Literal[3, 4, 8] = 8
    group_size: Optional[int] = Field(default=None, ge=8, le=8192)
    # also store the input (word) embedding table as int8 rows with a scale per row; refused for a
    # table tied to the LM head (its rows are the head's weights too)
    embeddings: bool = False


@register("rtn", "quantize", RTNConfig,
          "weight-only int8/int4 round-to-nearest, per channel or group-wise, packed; reloads with slimctl",
          loads_with="slimctl", streams=True,
          proposals=(Proposal("int8-weight-only", {"bits": 8, "group_size": None}, order=40),
                     Proposal("int4-rtn-g64", {"bits": 4, "group_size": 64}, order=50)))
def apply(model, cfg: RTNConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    groups = plan_groups(layers, cfg, ctx)
    err = {}
    for name, lin in ctx.track(visit(model, layers), "rtn", len(layers)):
        g = groups[name]
        sch = QScheme(cfg.bits, g, cfg.symmetric, cfg.fp16_scales, cfg.scale_search)
        w, (codes, scale, zero) = round_layer(model, name, lin, sch)
        err[name] = float((dequantize_groups(codes, scale, zero, g) - w).norm() / w.norm().clamp(min=1e-12))
    out = {"layers": list(err), "bits": cfg.bits, "groups": groups, "symmetric": cfg.symmetric,
           "relative_weight_error": err}
    if cfg.embeddings:
        if stream_of(model):
            refuse("embeddings: true")
        out["embeddings"] = embeddings_int8(model)
    return out


def round_layer(model, name: str, lin, sch: QScheme) -> tuple[torch.Tensor, tuple]:
    """Replace one Linear by its round-to-nearest WeightOnlyLinear (sch.group_size: the group used);
    returns its float32 weight and the (codes, scale, zero) it was stored as."""
    w = lin.weight.detach().float()
    q = rtn(w, sch, sch.group_size)
    set_submodule(model, name, WeightOnlyLinear.from_codes(lin, *q, sch.bits, sch.group_size, sch.scale_dtype))
    return w, q


def round_outside_blocks(model, names: list[str], targets: dict, schemes: dict[str, QScheme], ctx) -> None:
    """Layers a block-wise calibrated step (GPTQ, AutoRound) did not reach, outside the repeated blocks: rounded to
    nearest, and a note says which."""
    if names:
        round_layers(model, {n: targets[n] for n in names}, schemes)
        ctx.notes.append(f"{len(names)} layers outside the repeated blocks were quantized with RTN: {', '.join(names[:3])}")


def round_layers(model, layers: dict, schemes: dict[str, QScheme]) -> None:
    """Replace each Linear by its round-to-nearest WeightOnlyLinear (scheme.group_size: the group used)."""
    from ..results import stages

    with stages.stage(stages.ROUND):
        for name, lin in visit(model, layers.items()):
            round_layer(model, name, lin, schemes[name])


def embeddings_int8(model) -> dict:
    """The input word-embedding table stored as int8 rows (Int8Embedding); refused while tied to the LM head."""
    from ..errors import UnsupportedError
    from ..quant.layers import Int8Embedding, row_multiplier
    from .tying import module_name, shares_embedding

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and shares_embedding(model, head):
        raise UnsupportedError("embeddings: true would quantize a word-embedding table tied to the LM head; leave it "
                               "false, or untie and quantize both with an lm_head step (embeddings: true)")
    if row_multiplier(emb) is None:  # a subclass may do anything to its rows; Gemma's scaled lookup is known
        raise UnsupportedError(f"embeddings: true needs an nn.Embedding input table (plain or scaled), this model has "
                               f"{type(emb).__name__}")
    name = module_name(model, emb)
    q = Int8Embedding.from_embedding(emb)
    w = emb.weight.detach().float()
    set_submodule(model, name, q)
    return {"module": name, "relative_weight_error": float((q.dequantized(torch.float32) - w).norm() / w.norm())}
