"""One cell of the family x method matrix: a tiny model of a family slimmed by one method through the
same steps, artifact save and reload check a user's run takes, with its quality against the base
(KL and top-1 agreement of next-token distributions, or cosine of encoder states). Used by
tests/test_families.py and scripts/bench_families.py."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

_CALIB = dict(calib_samples=4, calib_seq_len=32)
METHODS: dict[str, dict[str, Any]] = {
    "rtn": dict(method="rtn", bits=4, group_size=32),
    "gptq": dict(method="gptq", bits=4, group_size=32, **_CALIB),
    "awq": dict(method="awq", bits=4, group_size=32, grid=5, clip_grid=5, **_CALIB),
    "smoothquant": dict(method="smoothquant", **_CALIB),
    "mixed": dict(method="mixed", avg_bits=6.0, group_size=32, **_CALIB),
    "wanda": dict(method="wanda", sparsity=0.5, **_CALIB),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5, **_CALIB),
    "magnitude": dict(method="magnitude", sparsity=0.5),
    "structured": dict(method="structured", ffn=0.25, **_CALIB),
}
# bench-only (scripts/bench_families.py): an ONNX export per family takes seconds each
EXTRA: dict[str, dict[str, Any]] = {"onnx": dict(method="onnx", quantization="dynamic")}
TEXTS = ["The central bank raised interest rates again on Thursday, citing persistent inflation.",
         "Shares of the company fell after it warned that profits would be lower this year."]


def _outputs(model, enc):
    import torch

    with torch.inference_mode():
        out = model(**enc)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def quality(base, slim, tokenizer, causal: bool) -> dict[str, float]:
    """KL(base || slim) per token and top-1 agreement (causal LM), or mean cosine of hidden states; and the
    relative output error ‖slim − base‖ / ‖base − its mean‖ (about 1 for a model that lost its function,
    whatever its weights: the one figure that also means something on random-weight tiny models)."""
    import torch
    import torch.nn.functional as F

    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # a WordPiece tokenizer's token_type_ids mean
    # nothing to a decoder (GPT-2 would add wte[0] to every position) and an ONNX graph takes only these two
    a, b = _outputs(base, enc).float(), _outputs(slim, enc).float()
    mask = enc["attention_mask"].bool()
    centred = a[mask] - a[mask].mean(-1, keepdim=True)
    rel = {"rel_err": round(float((b[mask] - a[mask]).norm() / centred.norm().clamp(min=1e-12)), 5)}
    if not causal:
        return {"cosine": round(float(F.cosine_similarity(a[mask], b[mask], dim=-1).mean()), 5), **rel}
    pa, pb = F.log_softmax(a[mask], -1), F.log_softmax(b[mask], -1)
    kl = float((pa.exp() * (pa - pb)).sum(-1).mean())
    top1 = float((a[mask].argmax(-1) == b[mask].argmax(-1)).float().mean())
    return {"kl": round(kl, 6), "top1": round(top1, 4), **rel}


def slim_and_save(base, recipe, out: Path, source: str):
    """`base` (a LoadedModel, left as it is) through `recipe`'s steps, then saved to `out` with slimctl's reload
    check, as a user's run takes them; (the Slimmed model in memory, the Artifact)."""
    from .pipeline import Slimmed, save_and_verify
    from ..steps import UI, apply_steps

    slim = Slimmed(*apply_steps(copy.deepcopy(base.model), base.tokenizer, recipe, base.kind, UI()))
    return slim, save_and_verify(base, slim, out, recipe, source, UI())


def run_cell(family: str, method: str, tokenizer, workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Slim a tiny `family` model with `method`; the cell's result: "ok" with quality, layers changed and
    the reload check, or "refused" with the one-line message a user would see."""
    from .. import recipe as R
    from ..errors import SlimctlError
    from ..models import load
    from ..families import tiny

    base_dir = workdir / f"{family}-base"
    if not (base_dir / "config.json").exists():
        m = tiny.build(family, tokenizer, seed)
        m.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    base = load(str(base_dir))
    recipe = R.from_dict({"version": 1, "name": f"{family}-{method}", "steps": [{**METHODS, **EXTRA}[method]]}, "matrix")
    t0 = time.perf_counter()
    try:
        slim, art = slim_and_save(base, recipe, workdir / f"{family}-{method}", str(base_dir))
    except SlimctlError as e:
        return {"family": family, "method": method, "status": "refused", "message": str(e)}
    check = art.reload_check
    return {"family": family, "method": method, "status": "ok", "seconds": round(time.perf_counter() - t0, 2),
            "layers_changed": slim.steps[0].layers_changed, "loads_with": art.loads_with,
            "reload_max_abs_diff": check["max_abs_diff"], "notes": slim.notes,
            **quality(base.model, slim.model, base.tokenizer, base.kind != "encoder")}


def kernel_cell(family: str, tokenizer, workdir: Path, seed: int = 0) -> dict[str, Any]:
    """The int4 RTN g32 artifact of a tiny `family` model on slimctl's fused kernels (bf16 activations, as
    `bench` and `eval` run it): how many layers got a fused kernel, which kept the dequantize path and why,
    and the output error against the same artifact on the dequantize path."""
    from ..quant.kernels import accelerate

    art, failed = _rtn_artifact(family, tokenizer, workdir, seed)
    if art is None:
        return {**failed, "method": "kernels"}
    fused = copy.deepcopy(art.model)
    plan = accelerate(fused, "cpu", batch=art.kind == "encoder")
    q = quality(art.model, fused, art.tokenizer, art.kind != "encoder")
    return {"family": family, "method": "kernels", "status": "ok", "fused": len(plan.fused), "fallback": plan.fallback,
            "act_dtype": plan.act_dtype, **q}


def compiled_cell(family: str, tokenizer, workdir: Path, steps: int = 8) -> dict[str, Any]:
    """The int4 RTN artifact on the fused kernels, decoded greedily with `bench --compile`'s decoder (static
    KV cache, torch.compile'd step) and with the eager loop: the same tokens, or the refusal a user sees."""
    import torch

    from ..bench.decode import CompiledDecoder, EagerDecoder, greedy
    from ..errors import SlimctlError
    from ..quant.kernels import accelerate

    art, failed = _rtn_artifact(family, tokenizer, workdir)
    if art is None:
        return {**failed, "method": "compiled"}
    if art.kind != "causal-lm":
        return {"family": family, "method": "compiled", "status": "n/a", "message": "decode applies to causal LMs"}
    accelerate(art.model, "cpu", batch=False)
    enc = tokenizer(TEXTS[:1], return_tensors="pt")
    ids, mask = enc["input_ids"][:, :16], enc["attention_mask"][:, :16]
    torch.manual_seed(0)
    torch._dynamo.reset()  # one process runs many cells: past Dynamo's recompile limit it would fall back to eager
    try:
        dec = CompiledDecoder(art.model, 1, ids.shape[1] + steps, "cpu")
        got = greedy(dec, ids, mask, steps)
    except SlimctlError as e:
        return {"family": family, "method": "compiled", "status": "refused", "message": str(e)}
    want = greedy(EagerDecoder(art.model), ids, mask, steps)
    if not dec.compile_seconds or dec.compile_seconds < 0.2:  # no compile happened: the check would be vacuous
        return {"family": family, "method": "compiled", "status": "not compiled", "message": f"{dec.compile_seconds} s"}
    return {"family": family, "method": "compiled", "status": "ok" if got == want else "differs",
            "same_tokens": got == want, "compile_seconds": round(dec.compile_seconds, 1)}


def _rtn_artifact(family: str, tokenizer, workdir: Path, seed: int = 0):
    """(the family's int4 RTN artifact, None), made once per workdir (the matrix's rtn cell made it already),
    or (None, the failed cell)."""
    from ..models import load

    art_dir = workdir / f"{family}-rtn"
    if not (art_dir / "config.json").exists():
        r = run_cell(family, "rtn", tokenizer, workdir, seed)
        if r["status"] != "ok":
            return None, r
    return load(str(art_dir)), None
