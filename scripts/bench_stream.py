#!/usr/bin/env python
"""Benchmark of --stream: slim a model larger than the memory it is allowed, and show the in-memory
path cannot. Writes bench-results/stream.json.

1. scripts/make_big_model.py writes a random-initialised Llama (default ~3.4 GB fp32, 16 layers,
   hidden 2048, intermediate 5632, 16/4 heads, vocab 32,000, untied) as sharded safetensors.
2. `slimctl run` of a GPTQ int4 recipe with `stream: true`, in a memory cgroup capped at --cap-gb
   (a hard cap: the kernel reclaims or kills above it); the report's peak RSS, per-block seconds.
3. Negative control: the same recipe without streaming, under the same cap: it must fail.
4. The artifact reloads with plain transformers (compressed-tensors) and with slimctl, and both give
   the logits of a streamed forward of the artifact within 1e-4.
5. With --l70b: two layers of Llama-70B shape (hidden 8192, intermediate 28672, 64/8 heads) streamed
   the same way (no cap): seconds and peak memory per layer, extrapolated to 80 layers.

Run it alone on the machine:  .venv/bin/python scripts/bench_stream.py [--l70b]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

RECIPE = """version: 1
name: {name}
stream: {stream}
steps:
  - method: gptq
    bits: 4
    group_size: 128
    calib_samples: {calib}
eval: {eval}
bench: {{skip: true}}
"""


def memory_cgroup() -> Path | None:
    """This process's own memory cgroup folder, if the machine lets us make children in it (v1 or v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, ctrl, path = line.split(":", 2)
        if "memory" in ctrl.split(","):
            p = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (p / "memory.limit_in_bytes").exists():
                return p
        if num == "0" and ctrl == "":
            p = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (p / "memory.max").exists() or (p / "cgroup.controllers").exists():
                return p
    return None


class Cap:
    """A child memory cgroup with a hard limit; processes started with `preexec` run inside it."""

    def __init__(self, gb: float):
        parent = memory_cgroup()
        if parent is None:
            raise SystemExit("no writable memory cgroup here: cannot impose a hard memory cap")
        self.path = parent / f"slimctl-cap-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        limit = str(int(gb * 2**30))
        v1 = (self.path / "memory.limit_in_bytes").exists()
        (self.path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit)
        self.bytes = int(limit)

    def preexec(self):
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self):
        try:
            self.path.rmdir()
        except OSError:
            pass


def slimctl_run(recipe: Path, model: Path, out: Path, cap: Cap | None, timeout: float) -> dict:
    cmd = [PY, "-m", "slimctl", "run", str(recipe), "-m", str(model), "--out", str(out), "--overwrite", "--json"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                           preexec_fn=cap.preexec if cap else None, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"returncode": None, "seconds": timeout, "error": "timeout"}
    res = {"returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "stderr_tail": r.stderr.strip().splitlines()[-3:]}
    if r.returncode == 0:
        res["report"] = json.loads(r.stdout)
    return res


def reload_check(art: Path) -> dict:
    """Logits of the artifact loaded whole (plain transformers; slimctl) vs a streamed forward of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimctl.evaluate.streamed import forward_logits
    from slimctl.models import load
    from slimctl.formats.streamed import open_streamed, read_meta

    ids = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 9199, 2944, 102] * 3])}
    model, st = open_streamed(art, "causal-lm", read_meta(art))
    try:
        streamed = forward_logits(model, [ids])[0]
    finally:
        st.close()
    out = {}
    for name, loader in (("transformers", lambda: AutoModelForCausalLM.from_pretrained(art).eval()),
                         ("slimctl", lambda: load(str(art)).model)):
        m = loader()
        with torch.inference_mode():
            lg = m(**ids).logits
        out[name] = {"max_abs_diff_vs_streamed": (lg - streamed).abs().max().item(),
                     "logit_scale": streamed.abs().max().item(), "class": type(m).__name__}
        del m
    return out


def summary(res: dict, model_bytes: int) -> dict:
    rep = res.get("report") or {}
    mem = rep.get("memory", {})
    step = (rep.get("slimmed", {}).get("steps") or [{}])[0]
    ev = rep.get("delta", {}).get("quality", {})
    return {"returncode": res["returncode"], "wall_seconds": res["seconds"], "step_seconds": step.get("seconds"),
            "seconds_per_block": mem.get("seconds_per_block"), "memory": mem, "fp32_bytes": model_bytes,
            "peak_above_start_over_fp32": mem.get("peak_above_start_over_fp32"),
            "reload_check": rep.get("artifact", {}).get("reload_check"), "quality": ev or None,
            "baseline_perplexity": ((rep.get("baseline") or {}).get("eval") or {}).get("metrics"),
            "slimmed_perplexity": ((rep.get("slimmed") or {}).get("eval") or {}).get("metrics"),
            "artifact_files": len((rep.get("artifact") or {}).get("files", [])), "stderr_tail": res.get("stderr_tail")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/slimctl-stream-bench"))
    p.add_argument("--cap-gb", type=float, default=1.5, help="hard memory cap for both runs (cgroup)")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens of held-out BBC scored (0: no eval)")
    p.add_argument("--l70b", action="store_true", help="also two Llama-70B-shaped layers, for a per-layer estimate")
    p.add_argument("--only-l70b", action="store_true", help="run only the 70B-shape part, adding it to an existing --out")
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "stream.json")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.only_l70b:
        result = json.loads(a.out.read_text())
        result["l70b_two_layers"] = l70b(a)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["l70b_two_layers"], indent=1)[:3000])
        return 0
    big = a.work / "big-llama"
    if not (big / "model.safetensors.index.json").exists():
        subprocess.run([PY, str(REPO / "scripts" / "make_big_model.py"), str(big)], check=True)
    size = json.loads((big / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    ev = f"{{max_tokens: {a.eval_tokens}, seq_len: 512}}" if a.eval_tokens else "{skip: true}"
    result: dict = {"machine": machine(), "model": {"path": str(big), "fp32_bytes": size, "shards": 9,
                                                    "shape": "Llama 16 x (2048, 5632), 16/4 heads, vocab 32000, untied"},
                    "cap_bytes": int(a.cap_gb * 2**30)}
    cap = Cap(a.cap_gb)
    try:
        for stream in (True, False):
            recipe = a.work / f"gptq-{'stream' if stream else 'memory'}.yaml"
            recipe.write_text(RECIPE.format(name=recipe.stem, stream=str(stream).lower(), calib=a.calib, eval=ev))
            print(f"slimctl run {recipe.name} under a {a.cap_gb} GB cap", file=sys.stderr, flush=True)
            res = slimctl_run(recipe, big, a.work / f"out-{recipe.stem}", cap, timeout=3600)
            result["streamed" if stream else "in_memory_control"] = summary(res, size)
    finally:
        cap.close()
    if result["streamed"]["returncode"] == 0:
        result["reload"] = reload_check(a.work / "out-gptq-stream" / "model")
    if a.l70b:
        result["l70b_two_layers"] = l70b(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:3000])
    return 0 if result["streamed"]["returncode"] == 0 and result["in_memory_control"]["returncode"] != 0 else 1


def l70b(a) -> dict:
    path = a.work / "l70b-2layers"
    if not (path / "model.safetensors.index.json").exists():
        subprocess.run([PY, str(REPO / "scripts" / "make_big_model.py"), str(path), "--hidden", "8192", "--intermediate",
                        "28672", "--layers", "2", "--heads", "64", "--kv-heads", "8", "--shard-mb", "1000"], check=True)
    size = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    recipe = a.work / "gptq-l70b.yaml"
    recipe.write_text(RECIPE.format(name="gptq-l70b", stream="true", calib=a.calib, eval="{skip: true}"))
    res = summary(slimctl_run(recipe, path, a.work / "out-l70b", None, timeout=7200), size)
    per = (res.get("seconds_per_block") or {}).get("gptq")
    res["estimate_80_layers"] = {"gptq_hours": round(per * 80 / 3600, 2) if per else None,
                                 "peak_rss_mb": (res.get("memory") or {}).get("peak_rss_mb"),
                                 "note": "per-layer time x 80; peak memory is one layer's and does not grow with depth"}
    return res


def machine() -> dict:
    import platform

    import psutil
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    sys.exit(main())
