"""A short libFuzzer run of each parser harness (tests/fuzz/), then the differential check
of csrc/chatjson.c against json.loads over the corpus it grew. `make fuzz` runs the long
version. Needs clang with libFuzzer (.ci/setup.sh installs it)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parsers_survive_a_short_fuzz_run_and_chatjson_agrees_with_json_loads(tmp_path):
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (.ci/setup.sh installs it)")
    # Under `make test-asan` gcc's libasan is preloaded; clang's binaries carry their own.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    # ...but the differential check that imports semex (built against gcc's ASan) needs it
    # back; that script drops it again for the clang-built dump it runs.
    python_semex = sys.executable
    if os.environ.get("LD_PRELOAD"):
        python_semex = (f"env LD_PRELOAD={os.environ['LD_PRELOAD']} "
                        f"ASAN_OPTIONS={os.environ.get('ASAN_OPTIONS', '')} {sys.executable}")
    proc = subprocess.run(
        ["make", "-s", "-C", os.path.join(HERE, "fuzz"), "run", "FUZZ_RUNS=30000",
         f"BUILD={tmp_path}", f"PYTHON={sys.executable}", f"PYTHON_SEMEX={python_semex}"],
        capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("stat::number_of_executed_units: 30000") == 5, proc.stdout
    assert "parsed by chatjson, 0 mismatches" in proc.stdout, proc.stdout
    assert "parsed by nativejson, 0 mismatches" in proc.stdout, proc.stdout
    assert re.search(r"diff_rowjson: \d+ inputs, [1-9]\d* rows read in C, all equal",
                     proc.stdout), proc.stdout
