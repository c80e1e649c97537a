"""Mixed precision per Linear under a bits-per-weight budget: measure what quantizing each Linear
alone costs (KL of the next-token distribution; hidden-state error for encoders), choose int4, int8
(or float) per Linear to minimise the summed cost with the average bits per weight (scales and zero
points counted) at or under `avg_bits`, then quantize each Linear at its width with GPTQ or RTN."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from .calibrate import calibration_batches
from ..kinds import CAUSAL_LM
from ..quant.integer import QScheme, ScaleSearch, resolve_group
from .sensitivity import Choice, allocate, check_budget, layer_costs
from .registry import (CalibrationOptions, LayerSelection, StepContext, WeightOnlyOptions, plan_groups, register, select_linears)


class MixedConfig(LayerSelection, CalibrationOptions):
    avg_bits: float = Field(default=4.5, ge=2, le=32)  # budget over the chosen Linears, scales included
    group_size: Optional[int] = Field(default=128, ge=8, le=8192)  # of the int4 choice (an awq step before searches its grid)
    # several int4 choices, e.g. [256, 128, 64]: each Linear may get any of them (None: group_size alone)
    group_sizes: Optional[list[Annotated[int, Field(ge=8, le=8192)]]] = Field(default=None, min_length=1, max_length=8)
    group_size_8: Optional[int] = Field(default=None, ge=8, le=8192)  # of the int8 choice (None: per channel)
    group_size_3: Optional[int] = Field(default=None, ge=8, le=8192)  # adds an int3 choice with these groups (a 3-bit budget)
    allow_float: bool = False  # let a Linear stay in float when that is worth its bits
    symmetric: bool = True
    fp16_scales: bool = False
    scale_search: ScaleSearch = "absmax"  # as in rtn/gptq (registry.WeightOnlyOptions)
    strict: bool = False
    quantizer: Literal["gptq", "rtn"] = "gptq"  # how each Linear is quantized once its width is chosen
    dampening: float = Field(default=0.01, gt=0, le=1)  # GPTQ options, as in the gptq step
    act_order: bool = False
    block_size: int = Field(default=128, ge=8, le=4096)
    gptaq: bool = False  # GPTAQ's asymmetric calibration in the GPTQ quantizer (as in the gptq step; gptaq.py)
    gptaq_alpha: float = Field(default=0.25, gt=0, le=1)
    sensitivity_samples: int = Field(default=2, ge=1, le=1024)  # calibration texts for the per-Linear costs
    # how the per-Linear costs are found: "fisher" estimates every Linear's KL from one forward and
    # `sensitivity_draws` backward passes (slimctl/techniques/fisher.py; causal LMs); "measured" quantizes each Linear
    # alone and measures the KL with a forward pass per Linear and format (encoders always)
    sensitivity: Literal["fisher", "measured"] = "fisher"
    sensitivity_draws: int = Field(default=4, ge=1, le=64)  # labels drawn per token for the Fisher estimate
    sensitivity_seq_len: int = Field(default=256, ge=8, le=32_768)
    # the rounding the per-Linear costs are estimated with (None: `scale_search` itself); `signed` skips the mse
    # search's 52 candidate scales per group for every Linear and format (most of the sensitivity pass's time)
    sensitivity_scale_search: Optional[ScaleSearch] = None

    @model_validator(mode="after")
    def _gptaq_needs_gptq(self):
        if self.gptaq and self.quantizer != "gptq":
            raise ValueError("gptaq: true corrects GPTQ's rounding; it needs quantizer: gptq")
        return self


def _choices(cfg: MixedConfig) -> dict[str, Choice]:
    """The formats each Linear may get, their schemes rounding as the cost estimate does (the chosen format is then
    quantized with `scale_search`)."""
    def scheme(bits: int, group: int | None) -> QScheme:
        return QScheme(bits, group, cfg.symmetric, cfg.fp16_scales, cfg.sensitivity_scale_search or cfg.scale_search)

    out = {f"int4-g{g}" if g else "int4": Choice("int4", scheme(4, g)) for g in dict.fromkeys(cfg.group_sizes or [cfg.group_size])}
    if cfg.group_size_3:
        out[f"int3-g{cfg.group_size_3}"] = Choice("int3", scheme(3, cfg.group_size_3))
    out[f"int8-g{cfg.group_size_8}" if cfg.group_size_8 else "int8"] = Choice("int8", scheme(8, cfg.group_size_8))
    if cfg.allow_float:
        out["float"] = Choice("float", None)
    return out


def _costs(model, targets, choices, groups, batches, cfg: MixedConfig, ctx: StepContext) -> dict[str, dict[str, float]]:
    """The cost of each choice of each Linear: the Fisher estimate (causal LMs) or the measured KL / error."""
    from ..stream.skeleton import refuse, stream_of

    per = {n: choices for n in targets}
    if cfg.sensitivity == "fisher" and ctx.kind == CAUSAL_LM:
        from .fisher import fisher_costs

        return fisher_costs(model, targets, per, groups, batches, ctx.seed, cfg.sensitivity_draws, ctx.track)
    if cfg.sensitivity == "fisher":
        ctx.notes.append("mixed: the Fisher estimate needs next-token probabilities; this model's costs were measured")
    if stream_of(model):
        refuse("mixed's measured sensitivity (a forward pass of the whole model per Linear and format; "
               "sensitivity: fisher streams)")
    return layer_costs(model, targets, per, groups, batches, ctx.kind == CAUSAL_LM, ctx.track)


@register("mixed", "quantize", MixedConfig,
          "per-Linear int3/int4/int8 (or float) chosen from measured sensitivity under an avg_bits budget; "
          "reloads with slimctl", loads_with="slimctl", streams=True)
def apply(model, cfg: MixedConfig, ctx: StepContext) -> dict:
    targets = dict(select_linears(model, cfg.ignore))
    choices = _choices(cfg)
    g4 = {c: plan_groups(list(targets.items()), WeightOnlyOptions(bits=ch.scheme.bits, group_size=ch.scheme.group_size,
                                                                  strict=cfg.strict), ctx)
          for c, ch in choices.items() if ch.scheme is not None and ch.scheme.bits in (3, 4)}
    groups = {n: {c: g4[c][n] if c in g4 else resolve_group(lin.in_features, cfg.group_size_8) for c in choices}
              for n, lin in targets.items()}
    bits = {n: {c: ch.bits(targets[n], groups[n][c]) for c, ch in choices.items()} for n in targets}
    weights = {n: lin.in_features * lin.out_features for n, lin in targets.items()}
    check_budget(bits, weights, cfg.avg_bits)  # before any measuring
    batches = calibration_batches(ctx.tokenizer, ctx.kind, cfg.sensitivity_samples, cfg.sensitivity_seq_len,
                                  cfg.calib_data, ctx.seed)
    costs = _costs(model, targets, choices, groups, batches, cfg, ctx)
    pick = allocate(bits, costs, weights, cfg.avg_bits)
    schemes = {n: QScheme(choices[c].scheme.bits, groups[n][c], cfg.symmetric, cfg.fp16_scales, cfg.scale_search)
               for n, c in pick.items() if choices[c].scheme is not None}
    quantized = {n: targets[n] for n in schemes}
    if cfg.quantizer == "gptq":
        from .gptq import gptq_layers

        out = gptq_layers(model, quantized, schemes, cfg, ctx)
    else:
        from .rtn import round_layers

        round_layers(model, quantized, schemes)
        out = {}
    from ..quant.layers import bits_per_weight

    counts = {c: sum(1 for v in pick.values() if v == c) for c in choices}
    reached = bits_per_weight(model, list(targets))
    ctx.notes.append(f"mixed: {', '.join(f'{k} {v}' for k, v in counts.items() if v)} Linears at "
                     f"{reached:.3f} bits per weight (budget {cfg.avg_bits:g})")
    return {**out, "layers": list(targets), "quantizer": cfg.quantizer, "avg_bits": cfg.avg_bits, "allocation": pick,
            "allocation_counts": counts, "groups": {n: s.group_size for n, s in schemes.items()},
            "sensitivity": {n: {c: float(f"{v:.4g}") for c, v in cs.items()} for n, cs in costs.items()},
            "sensitivity_tokens": sum(b["input_ids"].numel() for b in batches),
            "sensitivity_method": "fisher" if cfg.sensitivity == "fisher" and ctx.kind == CAUSAL_LM else "measured",
            "bits_per_weight": reached}
