"""Against a gateway that answers 429 with no headers at all (the C mock's --bare-rate/
--bare-burst, an nginx limit_req lookalike), llm_batch finds the limit: every
row comes back, the 429s come in few episodes, and the engine paces at a learned rate.
benchmarks/bench_bare429.py measures the same at full scale."""
import json
import os
import selectors
import shutil
import subprocess
import urllib.request

import pytest

import semex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def gateway():
    if not shutil.which("make") or not shutil.which(os.environ.get("CC", "cc")):
        pytest.fail("make and a C compiler are needed to build benchmarks/mockserver")
    build = subprocess.run(["make", "-s", "-C", BENCH], capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    procs = []

    def start(*args):
        proc = subprocess.Popen([os.path.join(BENCH, "build", "mockserver"), "--port", "0",
                                 "--stdin-watch", "--latency-ms", "10", *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=10), "mockserver did not print its port"
        return f"http://127.0.0.1:{int(proc.stdout.readline().split()[1])}"

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=10)


def _get(url):
    with _opener.open(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rpm", [6000, None])
def test_llm_batch_learns_a_limit_told_only_by_bare_429s(gateway, rpm):
    base = gateway("--bare-rate", "100", "--bare-burst", "5")
    lm = semex.LM("mock", api_base=base + "/v1", api_key="sk-test", rpm=rpm,
                  max_concurrency=100, backoff_base=0.05, backoff_cap=1.0)
    try:
        prompts = [f"row {i}" for i in range(600)]
        out = semex.llm_batch(prompts, lm, max_concurrent=100, errors="objects")
        assert list(out) == [f"echo: {p}" for p in prompts]
        engine = lm.engine_stats()
    finally:
        lm.close()
    server = _get(base + "/_stats")
    assert server["responses_200"] == 600
    refused = server["responses_429"]
    assert refused >= 1                         # the gateway did refuse: the case is real
    assert engine["bare_429_episodes"] >= 1
    # One clump of refusals is one episode: fewer episodes than 429s (about a third on a
    # quiet machine; on a loaded one the requests in flight, and so the clumps, are smaller)
    assert engine["bare_429_episodes"] * 2 <= refused + 4
    # The learned pace is near the gateway's 100 req/s (6,000/min), never above the rpm.
    assert 1500 <= engine["learned_rpm"] <= (rpm or 12000)
    # Without the first clump (up to max_concurrent refused before any answer), few 429s.
    assert refused <= 100 + 0.05 * 600
