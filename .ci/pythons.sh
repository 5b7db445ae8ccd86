#!/usr/bin/env bash
# Build semex (-Werror) and run its tests on other Python versions, each in a venv of its own.
#   .ci/pythons.sh VERSION[:WHAT] ...      e.g.  .ci/pythons.sh 3.9 3.10:fast 3.13
# WHAT is `full` (the default: the whole suite) or `fast` (the build, the import, and the
# suite less its tests marked slow: the few that take seconds each to time the engine's
# rate limits, retries and kill/resume, or to fuzz its C parsers, none of it different from
# one Python version to another).
# The interpreter for 3.X is the newest $PYENV_ROOT/versions/3.X.* (default ~/.pyenv), else
# python3.X on PATH; when neither exists this fails, naming the version: a version that
# cannot be tested is a failure, never a skip. Venvs are .venv-py3.X in this checkout; later
# runs reuse them and only rebuild semex. pip keeps its cache (no --no-cache-dir).
# Installed: the light test dependencies (pytest, pytest-timeout, uvloop, pydantic, pandas,
# tqdm, pyarrow). The heavy optional ones (dask, ray, qdrant-client, nbclient) and the local
# LLM are left out on purpose: their tests skip with the missing package named, and they are
# tested on the main Python by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

LIGHT_DEPS=("setuptools>=77" "wheel" "pytest>=7" "pytest-timeout>=2" "uvloop>=0.17"
            "pydantic>=2" "pandas>=1.5" "numpy>=1.21" "tqdm>=4.60" "pyarrow>=10")

find_python() {  # VERSION -> path of an interpreter of that version, or nothing
    local want="$1" root="${PYENV_ROOT:-$HOME/.pyenv}" found=""
    if [ -d "$root/versions" ]; then
        found=$(ls -d "$root/versions/$want".* 2>/dev/null | grep -E "/$want\.[0-9]+$" |
                sort -V | tail -n1)
        if [ -n "$found" ] && [ -x "$found/bin/python" ]; then
            echo "$found/bin/python"
            return
        fi
    fi
    command -v "python$want" 2>/dev/null || true
}

[ $# -gt 0 ] || { echo "usage: .ci/pythons.sh VERSION[:full|:fast] ..." >&2; exit 2; }
for spec in "$@"; do
    version="${spec%%:*}"
    what="full"
    [ "$spec" = "$version" ] || what="${spec#*:}"
    case "$what" in full|fast) ;; *) echo "pythons.sh: $spec: use :full or :fast" >&2; exit 2;; esac
    started=$(date +%s)
    python=$(find_python "$version")
    if [ -z "$python" ]; then
        echo "pythons.sh: Python $version is not installed (looked for" \
             "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version.* and python$version on PATH):" \
             "install it (pyenv install $version) or drop it from .ci/run" >&2
        exit 1
    fi
    actual=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
        actual="nothing that runs"
    if [ "$actual" != "$version" ]; then
        echo "pythons.sh: Python $version is not installed: $python is $actual" >&2
        exit 1
    fi
    venv="$PWD/.venv-py$version"
    echo "--- Python $version ($what): $("$python" -VV | head -n1) -> ${venv#"$PWD"/}"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "${LIGHT_DEPS[@]}"
    SEMEX_WERROR=1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps \
        --force-reinstall .
    # Import from outside the checkout, so the installed build is what gets imported.
    (cd / && "$venv/bin/python" -c 'import semex, semex._engine as e; print("semex", semex.__version__, "on libcurl", e.curl_version().split()[0])')
    args=(-p no:cacheprovider -q)
    [ "$what" = full ] || args+=(-m "not slow")
    # pytest's own exit code stands: 5 (no test ran) fails this script like any other.
    "$venv/bin/python" -m pytest "${args[@]}"
    echo "--- Python $version ($what) passed in $(( $(date +%s) - started ))s"
done
