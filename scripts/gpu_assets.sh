#!/usr/bin/env bash
# What GPU_CHECK=calib needs on a GPU machine without network, written to .gpu-assets/ (ignored by git; carry it):
# smollm2-135m's tokenizer files and 64 BBC calibration articles as JSONL (a few hundred KB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-assets
HF_HUB_OFFLINE=1 .venv/bin/python - <<'PY'
import json
from slimctl.evaluate import data
from slimctl.models import load

m = load("smollm2-135m")
m.tokenizer.save_pretrained(".gpu-assets/tokenizer")
texts = [e.text for e in data.bbc("calib")][:64]
with open(".gpu-assets/calib.jsonl", "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
print(f"wrote .gpu-assets/tokenizer and {len(texts)} calibration texts")
PY
du -sh .gpu-assets
