"""The run report: one dict with schema slimctl.report/v1, written as report.json and report.md."""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = "slimctl.report/v1"
_PACKAGES = ("slimctl", "torch", "transformers", "safetensors", "pydantic", "onnxruntime", "numpy")


def environment(seed: int, device: str = "cpu") -> dict[str, Any]:
    versions = {"python": sys.version.split()[0]}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {"versions": versions, "platform": platform.platform(), "device": device, "seed": seed}
    if "torch" in sys.modules:  # only describe threads/devices when torch is already in use
        import torch

        from .bench.measure import cpu_name

        env["threads"] = torch.get_num_threads()
        env["cpu"] = cpu_name()
        env["cpus_available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "report.json", out_dir / "report.md"
    for path, text in ((j, json.dumps(report, indent=2, default=_default) + "\n"), (m, markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return j, m


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _metric_rows(r: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    b, s = r.get("baseline") or {}, r.get("slimmed") or {}
    be, se = b.get("eval") or {}, s.get("eval") or {}
    rows: list[tuple[str, Any, Any]] = []
    for k in sorted(set((be.get("metrics") or {})) | set((se.get("metrics") or {}))):
        rows.append((k, (be.get("metrics") or {}).get(k), (se.get("metrics") or {}).get(k)))
    for k, v in (se.get("vs_reference") or {}).items():
        rows.append((f"{k} (vs baseline)", None, v))
    bb, sb = b.get("bench") or {}, s.get("bench") or {}
    if bb or sb:
        lat_of = sb.get("latency_of") or bb.get("latency_of") or "latency"
        for q in ("p50", "p90", "p99"):
            rows.append((f"{lat_of} latency {q} (ms)", (bb.get("latency_ms") or {}).get(q), (sb.get("latency_ms") or {}).get(q)))
        for k in ("prefill_ms",):
            if k in bb or k in sb:
                rows.append(("prefill p50 (ms)", (bb.get(k) or {}).get("p50"), (sb.get(k) or {}).get("p50")))
        for k, label in (("decode_tokens_per_s", "decode tokens/s"),):
            if k in bb or k in sb:
                rows.append((label, bb.get(k), sb.get(k)))
        rows.append(("throughput samples/s", (bb.get("throughput") or {}).get("samples_per_s"), (sb.get("throughput") or {}).get("samples_per_s")))
        rows.append(("peak memory (MB)", bb.get("peak_memory_mb"), sb.get("peak_memory_mb")))
        rows.append(("size on disk (MB)", bb.get("size_mb"), sb.get("size_mb")))
    return rows


def markdown(r: dict[str, Any]) -> str:
    """Short enough for a PR comment: verdict first, then one table, then gates."""
    verdict = {True: "PASSED", False: "FAILED", None: "NO GATES"}[r.get("passed")]
    recipe = r.get("recipe") or {}
    steps = ", ".join(s.get("method", "?") for s in recipe.get("steps", []))
    lines = [f"# slimctl: {verdict} — {r.get('model', {}).get('source', '?')} · {recipe.get('name') or steps}", ""]
    d = r.get("delta") or {}
    bits = [f"{k} {_fmt(d[k])}" for k in ("speedup", "decode_speedup", "perplexity_ratio", "fidelity", "size_ratio") if d.get(k) is not None]
    if bits:
        lines += ["**" + " · ".join(bits) + "**", ""]
    lines += ["| metric | baseline | slimmed |", "|---|---:|---:|"]
    lines += [f"| {k} | {_fmt(b)} | {_fmt(s)} |" for k, b, s in _metric_rows(r)]
    gates = r.get("gates") or []
    if gates:
        lines += ["", "| gate | threshold | value | result |", "|---|---:|---:|---|"]
        for g in gates:
            res = {True: "pass", False: "**FAIL**", None: "n/a"}[g["passed"]]
            lines.append(f"| {g['name']} | {_fmt(g['threshold'])} | {_fmt(g['value'])} | {res} |")
    for w in r.get("warnings") or []:
        lines.append(f"\n> warning: {w}")
    env = r.get("environment") or {}
    art = r.get("artifact") or {}
    lines += ["", f"Steps: {steps}. Artifact: `{art.get('path', '–')}` ({art.get('loads_with', '?')}). "
              f"Machine: {env.get('cpu', '?')}, {env.get('threads', '?')} threads, seed {env.get('seed')}, "
              f"torch {env.get('versions', {}).get('torch', '?')}."]
    return "\n".join(lines) + "\n"
