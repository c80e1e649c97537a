"""Quick looks that measure accuracy only, on a few batches: the pre-filter of every candidate and the
per-block sensitivity that proposes mixed-precision candidates."""
from __future__ import annotations

import copy
from typing import Any

from .. import recipe as R
from ..results.report import Delta
from .rank import drop
from .runners import error_text

# The pre-filter calibrates on at most this many texts (GPTQ, SparseGPT… cost scales with them); a
# quick drop may differ a little from the full run's, which is why the cut-off sits at 3x the budget
# (and every survivor is measured in full).
PREFILTER_CALIB = 16
QUICK_KEYS = ("kl_divergence", "top1_agreement", "mean_cosine")


def quick_spec(eval_spec: R.EvalSpec, kind: str) -> R.EvalSpec:
    """The eval of a quick look: a few documents (encoders: a few dozen texts), 2,048 tokens at most."""
    from ..kinds import CAUSAL_LM

    return eval_spec.model_copy(update={"max_samples": 4 if kind != "encoder" else 24,
                                        "max_tokens": 2048 if kind == CAUSAL_LM else None})


def hopeless_above(max_drop: float) -> float:
    """A quick drop past 3x the budget (and the budget + 2 points, since a few batches are noisy) is hopeless."""
    return max(3 * max_drop, max_drop + 0.02)


def apply_quick(model, steps: list[dict[str, Any]], ctx, ignore: list[str] | None = None):
    """Apply steps for a quick look: calibration capped at PREFILTER_CALIB texts; `ignore` added to
    every step that can leave layers alone. Returns the (maybe replaced) model."""
    from .. import techniques

    for st in steps:
        t = techniques.get(st["method"])
        opts = {k: v for k, v in st.items() if k != "method"}
        if "calib_samples" in t.config.model_fields:
            opts["calib_samples"] = min(opts.get("calib_samples", PREFILTER_CALIB), PREFILTER_CALIB)
        if ignore is not None and "ignore" in t.config.model_fields:
            opts["ignore"] = list(opts.get("ignore", [])) + ignore
        t.apply(model, t.config(**opts), ctx)
        if ctx.replacement is not None:
            model, ctx.replacement = ctx.replacement, None
    return model


def _quick_drop(base, slim, quick: R.EvalSpec, metric: str, seed: int) -> tuple[float | None, Delta]:
    from ..evaluate import evaluate
    from ..results.delta import delta

    d = delta(evaluate(slim, base.tokenizer, base.kind, quick, reference=base.model, seed=seed).result(), None, None)
    return drop(d, metric), d


def prefilter(base, steps: list[dict[str, Any]], metric: str, quick: R.EvalSpec, seed: int) -> dict[str, Any]:
    """The drop of `steps` on a few batches; a candidate that cannot apply to this model is a result
    (its error), not a crash."""
    from .. import techniques

    try:
        slim = copy.deepcopy(base.model)
        ctx = techniques.StepContext(kind=base.kind, seed=seed, tokenizer=base.tokenizer)
        slim = apply_quick(slim, steps, ctx)
        d, qd = _quick_drop(base, slim, quick, metric, seed)
        del slim
        return {"prefilter": {"drop": d, "samples": quick.max_samples, **{k: getattr(qd, k) for k in QUICK_KEYS if getattr(qd, k, None) is not None}},
                "error": None}
    except Exception as e:  # noqa: BLE001
        return {"prefilter": {}, "error": error_text(e)}


def sensitivity(base, steps: list[dict[str, Any]], metric: str, quick: R.EvalSpec, seed: int, say,
                groups: int | None = None) -> list[dict[str, Any]]:
    """The metric cost of applying `steps` to one block of the model alone, for every block."""
    from .. import techniques
    from ..stream.blocks import find_blocks

    prefix, blocks = find_blocks(base.model)
    names = [f"{prefix}.{i}" for i in range(len(blocks))][:groups]
    out = []
    for i, blk in enumerate(names):
        slim = copy.deepcopy(base.model)
        ctx = techniques.StepContext(kind=base.kind, seed=seed, tokenizer=base.tokenizer)
        only = [n for n, _ in techniques.select_linears(slim, []) if not n.startswith(blk + ".")]
        slim = apply_quick(slim, steps, ctx, ignore=only)
        d, _ = _quick_drop(base, slim, quick, metric, seed)
        out.append({"block": blk, "drop": d})
        say(f"sensitivity {i + 1}/{len(names)}: {blk} costs {d:.4f}" if d is not None else f"sensitivity {blk}: n/a")
    return out
