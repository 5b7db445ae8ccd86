#!/usr/bin/env bash
# Make this checkout ready to run: system packages, a venv, semex built into it.
#   .ci/setup.sh [VENV] [extra pip requirements...]
# Environment: SEMEX_SANITIZE=1 builds the ASan/UBSan extension; SEMEX_WERROR=1 adds -Werror.
# Idempotent: later runs only rebuild semex.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true

need_apt=()
pkg-config --exists libcurl 2>/dev/null || need_apt+=(libcurl4-openssl-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v cc >/dev/null || need_apt+=(gcc)
command -v openssl >/dev/null || need_apt+=(openssl)  # the TLS tests make a CA
# clang's libFuzzer for tests/fuzz (tests/test_fuzz.py runs it briefly; `make fuzz` longer).
command -v clang >/dev/null || need_apt+=(clang)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "semex setup: installing ${need_apt[*]} with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "semex setup: missing system packages: ${need_apt[*]}" >&2
        echo "  install them with: sudo apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
fi

python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
"$venv/bin/python" -m pip install -q "pytest>=7" "pytest-timeout>=2" "uvloop>=0.17" "pydantic>=2" "pandas>=1.5" "tqdm>=4.60" nbclient nbformat ipykernel ipywidgets "pyarrow>=10" "dask[dataframe]>=2024.1" "distributed>=2024.1" "qdrant-client>=1.10" "ray[data]>=2.9" "$@"
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall .
