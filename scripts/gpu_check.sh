#!/usr/bin/env bash
# GPU_CHECK=speed: only the CUDA tests and scripts/gpu_speed.py (fused kernels, compiled decode; about 6 minutes).
# GPU_CHECK=calib: GPTQ and AWQ+GPTQ calibrated on the GPU against the CPU (tests and scripts/gpu_calib.py).
# One prepared GPU check for a machine with no network (the `device` tool's lent H100/H200), within
# 10 minutes (GPU_BENCH=0: about 7): install carried wheels, run the CUDA tests, benchmark a 1.2 B-parameter random Llama in
# bf16/fp16, int8/int4 weight-only, FP8 and NF4 with roofline fractions and a batch sweep, 2:4 sparse
# vs dense, a CPU-vs-GPU placement of the same model, and a GPU batch sweep capped so that its large
# points run out of GPU memory for real, and `bench --semi-structured` on a 2:4-pruned copy. Writes JSON and logs under $OUT (or ./gpu-out).
#   Carry wheels (.whl/, ignored by git): python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
T0=$(date +%s)
LOG="$OUT/logs.txt"  # every stderr and the timeline in one file (the device tool returns at most 8 files)
stamp() { echo "[gpu_check] $1 at $(( $(date +%s) - T0 )) s" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
stamp "wheels installed"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv >> "$LOG" 2>&1
python3 - <<'PY' > "$OUT/env.json" 2>&1
import json, os, torch, importlib
v = {m: getattr(importlib.import_module(m), "__version__", "?") for m in ("torch", "transformers")}
for m in ("bitsandbytes", "onnxruntime", "pydantic"):
    try: v[m] = importlib.import_module(m).__version__
    except Exception as e: v[m] = f"missing: {e}"
try:
    import onnxruntime; prov = onnxruntime.get_available_providers()
except Exception as e: prov = str(e)
print(json.dumps({"versions": v, "gpu": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                  "cpu_count": os.cpu_count(), "onnxruntime_providers": prov}))
PY
timeout 170 python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_prune.py tests/test_eval_bench.py tests/test_kernels.py \
  -p no:cacheprovider > "$OUT/cuda-tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda-tests.txt"
stamp "cuda tests done"
if [ "${GPU_CHECK:-all}" = calib ]; then  # calibration on the GPU against the CPU (issue #33; about 8 minutes)
  # carry .gpu-assets/ (made here by `bash scripts/gpu_assets.sh`): a tokenizer and calibration text
  export SLIMCTL_TEST_TOKENIZER=$PWD/.gpu-assets/tokenizer
  timeout 150 python3 -m pytest -q -m cuda tests/test_cuda.py -k calibration_on_the_gpu -p no:cacheprovider \
    > "$OUT/cuda-calib-tests.txt" 2>&1; echo "cuda calibration tests rc=$?" >> "$OUT/cuda-calib-tests.txt"
  stamp "cuda calibration tests done"
  timeout 360 python3 scripts/gpu_calib.py --out "$OUT/gpu-calib.json" --tokenizer .gpu-assets/tokenizer \
    --data .gpu-assets/calib.jsonl --blocks 4 2>> "$LOG"
  echo "gpu_calib rc=$?" >> "$LOG"
  stamp "gpu_calib done"
  tail -5 "$OUT/cuda-calib-tests.txt"; grep -E "rc=|gpu_check|Error" "$LOG" | tail -30
  exit 0
fi
if [ "${GPU_CHECK:-all}" = speed ]; then  # the fast-path check alone (about 6 minutes): fused int4/int8, FP8, compiled decode
  timeout 330 python3 scripts/gpu_speed.py --out "$OUT/gpu-speed.json" --arch llama-1b 2>> "$LOG"
  echo "gpu_speed rc=$?" >> "$LOG"
  stamp "gpu_speed done"
  tail -5 "$OUT/cuda-tests.txt"; grep -E "rc=|gpu_check|gpu_speed\]|Error" "$LOG" | tail -30
  exit 0
fi
if [ "${GPU_BENCH:-1}" = 1 ]; then  # GPU_BENCH=0 skips the format table (already measured) to save device time
  timeout 220 python3 scripts/gpu_bench.py --out "$OUT/gpu-bench.json" --arch llama-1b 2>> "$LOG"
  echo "gpu_bench rc=$?" >> "$LOG"
  stamp "gpu_bench done"
fi
timeout 150 python3 -m slimctl bench --config llama-1b --device cpu,cuda --repeats 1 --slo-p95-ms 1000 \
  --hourly-cost cpu=0.68,cuda=3.50 --seq-len 128 --decode-tokens 8 --min-iters 3 --min-seconds 0 --json \
  > "$OUT/placement.json" 2>> "$LOG"; echo "placement rc=$?" >> "$LOG"
stamp "placement done"
timeout 160 python3 -m slimctl bench --config llama-1b --device cuda --dtypes bf16 --batch-sizes 1,8,32,128 --max-memory 6000 \
  --seq-len 512 --decode-tokens 16 --min-iters 3 --min-seconds 0 --json > "$OUT/sweep.json" 2>> "$LOG"
echo "sweep rc=$?" >> "$LOG"
stamp "sweep done"
timeout 220 python3 -m slimctl bench --config llama-1b --recipe recipes/prune-magnitude-2of4.yaml --device cuda --dtypes bf16 \
  --semi-structured --repeats 1 --seq-len 128 --decode-tokens 8 --min-iters 3 --min-seconds 0 --json \
  > "$OUT/semi-structured.json" 2>> "$LOG"; echo "semi-structured rc=$?" >> "$LOG"
stamp "semi-structured done"
tail -5 "$OUT/cuda-tests.txt"; grep -E "rc=|gpu_check|gpu_bench\]|Error" "$LOG" | tail -30
