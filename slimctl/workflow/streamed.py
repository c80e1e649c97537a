"""The parts of a streamed run (--stream, recipe `stream: true`; pipeline.run_streamed puts them
together): what streaming refuses, the sharded artifact and its streamed reload check, the side-by-side
perplexity streamed from the source and the artifact, and the memory record of the run. No whole model
is ever in memory; speed benchmarks, which need one, are skipped with a note."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UnsupportedError
from ..results.report import Artifact, EvalResult, StepRecord
from ..recipe import Recipe
from ..steps import UI

CHECK_TEXTS = ["The artifact measured must be the artifact evaluated.", "Second row, padded."]


def check_streamable(recipe: Recipe, folder: Path, load_options: dict) -> None:
    """Everything --stream refuses, before any long work."""
    from .. import techniques
    from ..kinds import read_config
    from ..formats.streamed import read_meta

    if folder.is_file():
        raise UnsupportedError("--stream reads a folder of safetensors weights, not a single .gguf file")
    cannot = [s.method for s in recipe.steps if not techniques.get(s.method).streams]
    if cannot:
        ok = sorted(n for n, t in techniques.load_all().items() if t.streams)
        raise UnsupportedError(f"{', '.join(cannot)} cannot run streamed (it needs the whole model in memory); "
                               f"--stream works with: {', '.join(ok)}")
    if recipe.export is not None:
        raise UnsupportedError("a GGUF export reads the whole slimmed model; export the artifact afterwards with slimctl export")
    if read_meta(folder).get("quantized_modules"):
        raise UnsupportedError(f"{folder} is already a slimctl artifact with quantized layers; --stream slims float models")
    if load_options.get("allow_pickle") and not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} holds pickle weights; --stream reads safetensors only")
    if read_config(folder).get("auto_map"):
        raise UnsupportedError("--stream builds the model from transformers' own classes; custom modelling code "
                               "(auto_map) is not streamed")


def save_and_check(base, slim, st, art_dir: Path, recipe: Recipe, model_spec: str, ui: UI, opened: list):
    """The sharded artifact, written atomically, then streamed back and compared with the slimmed
    model (its blocks from the spill folder) on two short texts."""
    from .._version import __version__
    from ..evaluate.streamed import forward_logits
    from ..formats import for_model
    from ..formats.sharded import save_streamed
    from ..models import save_artifact
    from ..quant.layers import quantized_modules_meta
    from ..kinds import CAUSAL_LM
    from ..formats.streamed import open_streamed

    fmt = for_model(slim.model)
    meta = {"slimctl_version": __version__, "source_model": model_spec, "kind": base.kind, "format": fmt.name,
            "recipe": recipe.to_dict(), "steps": [s.model_dump(include={"method", "options"}) for s in slim.steps],
            "loads_with": fmt.loads_with, "quantized_modules": quantized_modules_meta(slim.model), "streamed": True}
    ui.say(f"writing the sharded artifact to {art_dir}")
    files = save_artifact(base, slim.model, art_dir, meta, write=lambda m, tmp: save_streamed(st, tmp, track=ui.track))
    ui.say("streaming the artifact back to check it matches the slimmed model")
    art_model, art_st = open_streamed(art_dir, base.kind, meta)
    opened.append(art_st)
    enc = dict(base.tokenizer(CHECK_TEXTS, padding=True, return_tensors="pt"))
    a = forward_logits(slim.model, [enc])[0]
    b = forward_logits(art_model, [enc])[0]
    import torch

    check = {"bitwise_equal": bool(torch.equal(a, b)), "max_abs_diff": (a.float() - b.float()).abs().max().item(),
             "dtype": str(b.dtype).replace("torch.", ""), "streamed": True,
             "compared": "logits" if base.kind != "encoder" else "last_hidden_state", "causal": base.kind == CAUSAL_LM}
    return Artifact(path=str(art_dir), loads_with=fmt.loads_with, files=files, reload_check=check), art_model


def evaluate_streamed_pair(base, art_model, recipe: Recipe, ui: UI, opened: list, notes: list[str]) -> EvalResult | None:
    """Baseline (streamed from the source files, its last hidden states cached) and the artifact
    (streamed from its shards), side by side."""
    from ..evaluate.streamed import evaluate_streamed
    from ..formats.streamed import open_streamed

    from ..kinds import CAUSAL_LM

    if recipe.eval.skip:
        return None
    if base.kind != CAUSAL_LM:  # streamed evaluation is perplexity; the reload check above still compared states
        notes.append(f"accuracy was not evaluated: streamed evaluation covers causal LMs, this is a {base.kind} model; "
                     "run slimctl eval on the artifact with --against the source where it fits in memory")
        return None
    ui.say("evaluating baseline and artifact side by side, streamed")
    ref, ref_st = open_streamed(Path(base.path), base.kind)
    opened.append(ref_st)
    return evaluate_streamed(art_model, ref, Path(base.path), base.tokenizer, base.kind, recipe.eval, seed=recipe.seed,
                             track=ui.track, say=ui.say).result()


def memory_record(st, steps: list[StepRecord], rss, start_mb: float) -> dict[str, Any]:
    """Peak memory of the run beside the model's size: measured, not assumed."""
    n_params = st.params
    blocks = len(st.blocks)
    step_peak = max((s.peak_rss_mb or 0.0 for s in steps), default=0.0)
    peak = max(rss.peak_rss_mb, step_peak)
    fp32 = n_params * 4
    return {"streamed": True, "start_rss_mb": round(start_mb, 1), "peak_rss_mb": round(peak, 1),
            "peak_rss_anon_mb": round(rss.peak_anon_mb, 1), "peak_rss_file_mb": round(rss.peak_file_mb, 1), "peak_above_start_mb": round(peak - start_mb, 1),
            "model_fp32_mb": round(fp32 / 2**20, 1), "largest_block_mb": round(st.peak_block_bytes / 2**20, 1),
            "largest_unit_mb": round(st.peak_unit_bytes / 2**20, 1),
            "peak_above_start_over_fp32": round((peak - start_mb) * 2**20 / fp32, 4) if fp32 else None,
            "blocks": blocks, "seconds_per_block": {s.method: round(s.seconds / max(blocks, 1), 2) for s in steps},
            "sampled": f"VmRSS/RssAnon every {rss.every * 1000:.0f} ms ({rss.samples} samples) and each step's VmHWM"}
