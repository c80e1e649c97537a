"""Two causal LMs decoding in one process, step for step, so that a machine whose speed drifts from one second to
the next (a shared VM) slows both alike: the decode-speed ratio of two artifacts that differ by a few per cent.

Fresh-process rounds (runner.pair_isolated) pair the two sides at the scale of a round, a minute or so apart;
on a 2-vCPU VM the same artifact's decode speed moves by ±20 % between rounds, more than pruning a tenth of the
weights changes it. Here both models are loaded side by side, each on the kernels `slimctl bench` picks, each
gets the same prompt, and their decode steps alternate (A B, then B A, ...), each step timed alone: the ratio of
the two median step times compares steps taken milliseconds apart. Run it as the only job, in several fresh
processes (`python -m slimctl.bench.interleaved A B OUT_JSON [OPTIONS_JSON]`, what scripts/bench_prune_int4.py
--interleave does), swapping which model loads first."""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from ..heap import own_heap
from ..machine import torch_threads


def _prepare(folder: str, compile: bool, max_len: int):
    from ..models import load
    from ..quant.kernels import maybe_accelerate
    from .decode import CompiledDecoder, EagerDecoder

    loaded = load(folder)
    plan = maybe_accelerate(loaded.model, "auto", kind=loaded.kind)
    dec = CompiledDecoder(loaded.model, 1, max_len, "cpu") if compile else EagerDecoder(loaded.model)
    return dec, plan


def _request(decs: list, ids, mask, steps: int, flip: bool, times: list[list[float]]) -> None:
    """One prompt through both decoders; every decode step timed on its own, the order swapped each step."""
    nxt = [d.prefill(ids, mask) for d in decs]
    for t in range(steps):
        order = (0, 1) if (t % 2 == 0) != flip else (1, 0)
        for i in order:
            t0 = time.perf_counter()
            nxt[i] = decs[i].step(nxt[i])
            times[i].append(time.perf_counter() - t0)


def measure(folders: tuple[str, str], requests: int = 8, steps: int = 32, seq_len: int = 128,
            compile: bool = False, threads: int | None = None, seed: int = 0) -> dict:
    """Median decode-step time of each model over `requests` prompts of `seq_len` random tokens, `steps` greedy
    tokens each, steps interleaved; one warm-up request first (it also compiles). Runs on `threads` threads,
    given back afterwards."""
    with torch_threads(threads):
        return _measure(folders, requests, steps, seq_len, compile, seed)


def _measure(folders: tuple[str, str], requests: int, steps: int, seq_len: int, compile: bool, seed: int) -> dict:
    decs, plans = zip(*(_prepare(f, compile, seq_len + steps + 2) for f in folders))
    vocab = min(d.model.config.vocab_size for d in decs)
    gen = torch.Generator().manual_seed(seed)
    times: list[list[float]] = [[], []]
    with torch.inference_mode():
        for r in range(requests + 1):
            ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
            warm = [[], []]
            _request(list(decs), ids, torch.ones_like(ids), steps, r % 2 == 1, warm if r == 0 else times)
    med = [statistics.median(t) * 1e3 for t in times]
    return {"folders": list(folders), "decode": "compiled" if compile else "eager", "requests": requests,
            "steps": steps, "seq_len": seq_len, "threads": torch.get_num_threads(),
            "step_ms_p50": med, "speedup_b_over_a": med[0] / med[1], "steps_timed": [len(t) for t in times],
            "kernels": [p and {k: p[k] for k in ("act_dtype", "kernels", "dequantize_layers")} for p in plans]}


def in_processes(a: str, b: str, n: int, opts: dict | None = None, say=lambda m: None) -> list[dict]:
    """`measure` in n fresh processes, the load order swapped every time: each process's result with `b_speedup`,
    b's decode speedup over a whichever loaded first."""
    import subprocess
    import tempfile
    from pathlib import Path

    res = []
    for i in range(n):
        x, y = (a, b) if i % 2 == 0 else (b, a)
        say(f"interleaved decode, process {i + 1}/{n}")
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, "-m", "slimctl.bench.interleaved", str(x), str(y), f.name,
                            json.dumps(opts or {})], check=True)
            r = json.loads(Path(f.name).read_text())
        r["b_speedup"] = r["speedup_b_over_a"] if x == a else 1 / r["speedup_b_over_a"]
        res.append(r)
    return res


def main(argv: list[str]) -> int:
    own_heap()  # a process of slimctl's own: its heap is frozen before the model loads
    a, b, out = argv[:3]
    opts = json.loads(argv[3]) if len(argv) > 3 else {}
    res = measure((a, b), **opts)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
