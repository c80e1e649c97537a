"""The LM head (output embedding) quantized, int8 per output channel by default, untied from the input embedding
where the two share one table.

Weight-only steps leave the head alone (registry.protected_modules), yet at batch 1 its matrix is read once per
generated token like every block's: on smollm2-135m (49,152 x 576) it is about half of what an int4 model reads
per token, on Gemma 3 270M (262,144 x 640) several times the blocks. int8 per channel (`bits: 8`, one scale per
row) runs on torch's fused int8 kernel; scales rounded to fp16 by default, so the head also writes exactly into
GGUF's Q8_0 (the type llama.cpp itself often picks for `output.weight`). A tied head is untied: the input
embedding keeps its float table (a lookup reads one row per token) and the head gets its own quantized copy;
the config then says `tie_word_embeddings: false`, the artifact grows by the quantized head, and the report says so;
`embeddings: true` stores the input table as int8 rows too, and the artifact shrinks instead.
Put this step after any step that rewrites the head (rotate, AWQ/SmoothQuant folds)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, field_validator

from ..errors import UnsupportedError
from ..quant.integer import QScheme, ScaleSearch, dequantize_groups, rtn
from ..quant.layers import WeightOnlyLinear
from ..stream.skeleton import refuse, set_submodule, stream_of
from .registry import StepContext, TechniqueConfig, power_of_two_group, register
from .tying import module_name, shares_embedding, untie


class LMHeadConfig(TechniqueConfig):
    bits: Literal[4, 8] = 8
    group_size: Optional[int] = Field(default=None, ge=8, le=8192)  # None: one scale per output channel (row)
    fp16_scales: bool = True  # scales rounded to fp16 (GGUF Q8_0/Q4_0 store them so: an exact export)
    scale_search: ScaleSearch = "absmax"
    # also store the input embedding as int8 rows, one scale per row (a lookup reads one row per token: the size
    # falls, the speed does not change); with a tied head this is what keeps an untied artifact small
    embeddings: bool = False

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v):
        return power_of_two_group(v)


@register("lm_head", "quantize", LMHeadConfig,
          "the LM head weight-only int8 (per channel, fused kernel) or int4, untied from the input embedding if "
          "tied; joins another quantization step, after it", loads_with="slimctl", head_only=True)
def apply(model, cfg: LMHeadConfig, ctx: StepContext) -> dict:
    if stream_of(model):
        refuse("lm_head")
    name, head = _head(model)
    group = cfg.group_size or head.in_features
    if head.in_features % group:
        raise UnsupportedError(f"lm_head: group_size {group} does not divide the head's input width {head.in_features}")
    tied = shares_embedding(model, head)
    w = head.weight.detach().float()
    sch = QScheme(cfg.bits, group, True, cfg.fp16_scales, cfg.scale_search)
    codes, scale, zero = rtn(w, sch, group)
    layer = WeightOnlyLinear.from_codes(head, codes, scale, zero, cfg.bits, group, sch.scale_dtype)
    set_submodule(model, name, layer)
    added = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.weight_scale))
    if tied:
        untie(model, name)
        ctx.notes.append(f"the head ({name}) was tied to the input embedding; untied: the lookup keeps its table "
                         f"and the head is stored as int{cfg.bits} (+{added / 2**20:.1f} MB on disk, "
                         "tie_word_embeddings: false in the config)")
    err = float((dequantize_groups(codes, scale, zero, group) - w).norm() / w.norm().clamp(min=1e-12))
    out = {"layers": [name], "module": name, "bits": cfg.bits, "group_size": group, "untied": tied,
           "head_bytes": added, "relative_weight_error": {name: err}}
    if cfg.embeddings:
        from .rtn import embeddings_int8

        out["embeddings"] = embeddings_int8(model)
    return out


def _head(model) -> tuple[str, torch.nn.Linear]:
    """The output embedding as (module name, Linear); a clear refusal for anything else."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, WeightOnlyLinear):
        raise UnsupportedError("lm_head: the LM head is already quantized")
    if type(head) is not torch.nn.Linear:
        what = "no output embedding" if head is None else f"a {type(head).__name__} output embedding"
        raise UnsupportedError(f"lm_head: this model has {what}; the step quantizes a Linear LM head")
    return module_name(model, head), head
