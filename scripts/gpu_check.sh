#!/usr/bin/env bash
# One prepared GPU check for a machine with no network (the `device` tool's lent H100/H200), within
# 8 minutes: install carried wheels, run the CUDA tests, benchmark a 1.2 B-parameter random Llama in
# bf16/fp16, int8/int4 weight-only, FP8 and NF4 with roofline fractions and a batch sweep, and write
# JSON under $OUT (or ./gpu-out).
#   Carry wheels: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d .whl bitsandbytes pydantic pydantic-core typing-inspection \
#     annotated-types gguf pytest pluggy iniconfig hypothesis sortedcontainers
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 - <<'PY' > "$OUT/env.json"
import json, torch, importlib
v = {m: getattr(importlib.import_module(m), "__version__", "?") for m in ("torch", "transformers")}
for m in ("bitsandbytes", "onnxruntime"):
    try: v[m] = importlib.import_module(m).__version__
    except Exception as e: v[m] = f"missing: {e}"
print(json.dumps({"versions": v, "gpu": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0)}))
PY
timeout 120 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider > "$OUT/cuda-tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda-tests.txt"
timeout 330 python3 scripts/gpu_bench.py --out "$OUT/gpu-bench.json" --arch llama-1b 2> "$OUT/gpu-bench.log"
echo "gpu_bench rc=$?" >> "$OUT/gpu-bench.log"
cat "$OUT/cuda-tests.txt" | tail -3; tail -8 "$OUT/gpu-bench.log"
