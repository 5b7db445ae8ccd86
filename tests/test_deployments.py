"""One LM, several deployments (semex.deployments; the C scheduler's sx_deploy): requests
spread over two C mocks (benchmarks/mockserver.c) on loopback by their limits, one that dies
mid-run drains to the other with nothing lost, a 429ing one cools down alone, usage per
deployment, early errors naming the bad entry, keys out of reprs and pickles."""
import json
import os
import pickle
import selectors
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

import semex
from semex import errors as E
from semex._remote import LMSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
KEYS = ("sk-deploy-A-SECRET-1111", "sk-deploy-B-SECRET-2222")


class Mock:
    def __init__(self, *args):
        self.proc = subprocess.Popen([os.path.join(BENCH, "build", "mockserver"), "--port",
                                      "0", "--stdin-watch", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=10), "mockserver did not print its port"
        self.port = int(self.proc.stdout.readline().split()[1])
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def stats(self):
        with _opener.open(f"http://127.0.0.1:{self.port}/_stats", timeout=5) as r:
            return json.loads(r.read())

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def mocks():
    if not shutil.which("make") or not shutil.which(os.environ.get("CC", "cc")):
        pytest.fail("make and a C compiler are needed to build benchmarks/mockserver")
    build = subprocess.run(["make", "-s", "-C", BENCH], capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    started = []

    def start(*args):
        mock = Mock(*args)
        started.append(mock)
        return mock

    yield start
    for mock in started:
        mock.stop()


def _prompts(n):
    return [f"row {i}" for i in range(n)]


@pytest.mark.timeout(120)
def test_capacity_splits_by_each_deployments_rpm(mocks):
    slow = mocks("--latency-ms", "10", "--rpm", "3000")   # 50 req/s
    fast = mocks("--latency-ms", "10", "--rpm", "6000")   # 100 req/s
    lm = semex.LM("mock", deployments=[(slow.base, KEYS[0], 3000),
                                       {"api_base": fast.base, "api_key": KEYS[1],
                                        "rpm": 6000}],
                  max_concurrency=64, backoff_base=0.05)
    try:
        prompts = _prompts(900)
        out = semex.llm_batch(prompts, lm, max_concurrent=64, errors="objects")
        assert list(out) == [f"echo: {p}" for p in prompts]
        s, f = slow.stats(), fast.stats()
        assert s["requests"] + f["requests"] >= 900
        share = s["requests"] / (s["requests"] + f["requests"])
        assert 0.25 <= share <= 0.42, (s, f)  # a third by rpm (each one's first burst aside)
        refused = s["responses_429"] + f["responses_429"]
        assert refused <= 0.01 * (s["requests"] + f["requests"]), (s, f)
        by = out.usage.by_deployment
        assert list(by) == [slow.base, fast.base]
        assert by[slow.base].answered + by[fast.base].answered == 900
        assert by[slow.base].answered == s["requests"] - s["responses_429"]
        stats = lm.engine_stats()["deployments"]
        assert [d["name"] for d in stats] == [slow.base, fast.base]
        assert sum(d["ok"] for d in stats) == 900
    finally:
        lm.close()


@pytest.mark.timeout(120)
def test_a_deployment_that_dies_mid_run_drains_to_the_other(mocks):
    doomed = mocks("--latency-ms", "20")
    survivor = mocks("--latency-ms", "20")
    lm = semex.LM("mock", deployments=[(doomed.base, KEYS[0]), (survivor.base, KEYS[1])],
                  max_concurrency=32, backoff_base=0.05, backoff_cap=0.5)
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if doomed.stats()["requests"] >= 200:
                break
            time.sleep(0.005)
        doomed.kill()
        killed.set()

    thread = threading.Thread(target=killer)
    try:
        thread.start()
        prompts = _prompts(3000)
        out = lm([[{"role": "user", "content": p}] for p in prompts])
        thread.join()
        assert killed.is_set()
        assert out.errors == [None] * 3000
        assert out.outputs == [f"echo: {p}" for p in prompts]
        by = out.usage.by_deployment
        assert by[doomed.base].answered >= 200 - 32  # it had received 200; 32 in flight at most
        assert by[survivor.base].answered > by[doomed.base].answered
        assert by[doomed.base].answered + by[survivor.base].answered == 3000
        assert survivor.stats()["requests"] >= by[survivor.base].answered
        dead = lm.engine_stats()["deployments"][0]
        assert dead["trips"] >= 1 and dead["failed"] >= 1 and not dead["in_service"]
        assert out.usage.retries >= 1
    finally:
        thread.join()
        lm.close()


@pytest.mark.timeout(120)
def test_a_deployment_answering_429_cools_down_alone(mocks):
    # the LM does not know its limit (10 req/s): it says so with 429 + OpenAI's headers
    limited = mocks("--latency-ms", "10", "--rpm", "600")
    free = mocks("--latency-ms", "10")
    lm = semex.LM("mock", deployments=[(limited.base, KEYS[0]), (free.base, KEYS[1])],
                  max_concurrency=32, backoff_base=0.05)
    try:
        prompts = _prompts(1500)
        out = semex.llm_batch(prompts, lm, errors="objects")
        assert list(out) == [f"echo: {p}" for p in prompts]
        by = out.usage.by_deployment
        assert by[free.base].answered > 3 * by[limited.base].answered
        stats = lm.engine_stats()["deployments"]
        assert stats[0]["http_429"] >= 1 and stats[1]["http_429"] == 0
        assert stats[0]["trips"] == 0  # a 429 is a cool-down, not a failure
    finally:
        lm.close()


@pytest.mark.timeout(60)
def test_usage_and_cost_per_deployment_add_up(mocks):
    a, b = mocks(), mocks()
    lm = semex.LM("mock", deployments=[semex.Deployment(a.base, KEYS[0], name="east"),
                                       semex.Deployment(b.base, KEYS[1], name="west")],
                  input_price_per_million=1.0, output_price_per_million=2.0)
    try:
        out = lm([[{"role": "user", "content": p}] for p in _prompts(200)])
        by = out.usage.by_deployment
        assert set(by) == {"east", "west"} and all(u.answered > 0 for u in by.values())
        assert sum(u.prompt_tokens for u in by.values()) == out.usage.prompt_tokens
        assert sum(u.cost for u in by.values()) == pytest.approx(out.usage.cost)
        assert "by deployment: east:" in out.usage.summary()
        assert lm.total_usage.by_deployment["east"].answered == by["east"].answered
        lm([[{"role": "user", "content": "again"}]])
        assert sum(u.answered for u in lm.total_usage.by_deployment.values()) == 201
    finally:
        lm.close()


def test_each_deployment_sends_its_own_key(server):
    """Deployment 1 is the fake server, which answers 401 to any other key than its own:
    it answered rows, so the right key went to it (the C mock ignores keys)."""
    if not os.path.exists(os.path.join(BENCH, "build", "mockserver")):
        subprocess.run(["make", "-s", "-C", BENCH], check=True, timeout=120)
    mock = Mock()
    lm = semex.LM("gpt-4o-mini", deployments=[(mock.base, KEYS[0]),
                                              (server.base_url, server.api_key)],
                  max_concurrency=4)
    try:
        out = lm([[{"role": "user", "content": f"q{i}"}] for i in range(40)])
        assert out.errors == [None] * 40
        served = [r for r in server.log() if r["outcome"] == 200]
        assert out.usage.by_deployment[server.base_url].answered == len(served) >= 1
    finally:
        lm.close()
        mock.stop()


def test_a_refused_key_disables_that_deployment_only(server, caplog):
    """The fake server refuses any key but its own: with a wrong one there, that deployment
    is disabled and the C mock answers every row; with no deployment left, the call stops
    with the authentication error as an LM of one endpoint does."""
    mock = Mock()
    wrong = semex.LM("gpt-4o-mini", deployments=[(mock.base, KEYS[0]),
                                                 (server.base_url, KEYS[1])],
                     max_concurrency=4)
    try:
        with caplog.at_level("WARNING", logger="semex"):
            out = wrong([[{"role": "user", "content": f"q{i}"}] for i in range(40)])
        assert out.errors == [None] * 40
        assert out.usage.by_deployment[mock.base].answered == 40
        stats = wrong.engine_stats()["deployments"]
        assert stats[1]["disabled"] == "auth" and stats[0]["disabled"] == ""
        assert stats[1]["admitted"] >= 1 and stats[1]["ok"] == 0
        assert any("refused its API key" in r.getMessage() for r in caplog.records)
        assert all(KEYS[1] not in r.getMessage() for r in caplog.records)
        both = semex.LM("gpt-4o-mini", deployments=[(server.base_url, KEYS[0]),
                                                    (server.base_url, KEYS[1])])
        bad = both([[{"role": "user", "content": f"q{i}"}] for i in range(10)])
        both.close()
        assert any(isinstance(e, E.AuthenticationError) for e in bad.errors)
        assert all(KEYS[0] not in str(e) and KEYS[1] not in str(e)
                   for e in bad.errors if e is not None)
    finally:
        wrong.close()
        mock.stop()


def test_lm_of_lms_takes_their_endpoints_keys_and_limits():
    one = semex.LM("openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1", api_key=KEYS[0],
                   rpm=600)
    two = semex.LM("openai/gpt-4o-mini", api_base="http://127.0.0.1:10/v1", api_key=KEYS[1],
                   tpm=10000)
    lm = semex.LM([one, two])
    assert lm.model == "gpt-4o-mini"
    assert [d.rpm for d in lm.deployments] == [600, None]
    assert [d.tpm for d in lm.deployments] == [None, 10000]
    assert lm._targets[0][0] == "http://127.0.0.1:9/v1/chat/completions"
    assert f"Authorization: Bearer {KEYS[1]}" in lm._targets[1][1]
    assert lm._count_tokens
    with pytest.raises(E.ConfigurationError, match="different models"):
        semex.LM([one, semex.LM("other", api_base="http://127.0.0.1:9/v1", api_key="k")])
    # one deployment: an ordinary LM with its endpoint and the tighter of the limits
    single = semex.LM("m", deployments=[("http://127.0.0.1:9/v1", "k", 600)], rpm=1200)
    assert single.rpm == 600 and single._targets is None and single.url.endswith(
        ":9/v1/chat/completions")
    for x in (one, two, lm, single):
        x.close()


@pytest.mark.parametrize("entries, message", [
    ([("ftp://x", "k")], r"deployments\[0\]: api_base must be an http"),
    ([("http://127.0.0.1:9/v1", "k"), ("http://127.0.0.1:9/v1", "k", -5)],
     r"deployments\[1\]: rpm must be a positive number"),
    ([("http://127.0.0.1:9/v1", "k", 1, 2, 3)], r"deployments\[0\]: a tuple is \(api_base"),
    ([{"api_base": "http://127.0.0.1:9/v1", "model": "x"}],
     r"deployments\[0\]: unknown key 'model'"),
    ([{"api_key": "k"}], r"deployments\[0\]: api_base is missing"),
    ([("http://127.0.0.1:9/v1", "k"), 42], r"deployments\[1\]: must be an"),
    ([], "deployments is empty"),
    ("http://127.0.0.1:9/v1", "deployments must be a list"),
    ([{"api_base": "http://127.0.0.1:9/v1", "max_concurrency": 0}],
     r"deployments\[0\]: max_concurrency must be an integer >= 1"),
])
def test_bad_deployments_fail_early_naming_the_entry(entries, message):
    with pytest.raises(E.ConfigurationError, match=message):
        semex.LM("m", deployments=entries)


def test_a_missing_key_names_the_deployment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DEPLOY_B_KEY", raising=False)
    with pytest.raises(E.ConfigurationError,
                       match=r"deployments\[1\] \(https://b.example.com/v1\): no API key"):
        semex.LM("m", deployments=[("https://a.example.com/v1", "k"),
                                   ("https://b.example.com/v1",)])
    with pytest.raises(E.ConfigurationError, match="DEPLOY_B_KEY.*is not set"):
        semex.LM("m", deployments=[("https://a.example.com/v1", "k"),
                                   {"api_base": "https://b.example.com/v1",
                                    "api_key_env": "DEPLOY_B_KEY"}])
    with pytest.raises(E.ConfigurationError, match="not to LM"):
        semex.LM("m", api_key="k", deployments=[("https://a.example.com/v1", "k")])
    with pytest.raises(E.ConfigurationError, match="give the deployments once"):
        semex.LM([("https://a.example.com/v1", "k")], deployments=[])


def test_keys_stay_out_of_reprs_and_pickles(monkeypatch):
    monkeypatch.setenv("DEPLOY_B_KEY", KEYS[1])
    lm = semex.LM("m", deployments=[("https://a.example.com/v1", KEYS[0], 600),
                                    {"api_base": "https://b.example.com/v1",
                                     "api_key_env": "DEPLOY_B_KEY", "rpm": 1200}])
    try:
        for text in (repr(lm), repr(lm.deployments), repr(LMSpec(lm)),
                     lm.total_usage.summary(), pickle.dumps(lm).decode("latin-1")):
            assert KEYS[0] not in text and KEYS[1] not in text
        assert "<set>" in repr(lm)
        assert lm._redact(f"x {KEYS[0]} y {KEYS[1]}") == "x *** y ***"
        # elsewhere, a key given literally is not there: the error says what to do
        spec = pickle.loads(pickle.dumps(LMSpec(lm)))
        with pytest.raises(E.ConfigurationError,
                           match=r"deployments\[0\].*api_key_env=.*ship_api_key=True"):
            spec.build()
        # shipped on request; a key from api_key_env is read where the LM is rebuilt
        shipped = pickle.loads(pickle.dumps(LMSpec(lm, ship_api_key=True))).build()
        assert f"Authorization: Bearer {KEYS[0]}" in shipped._targets[0][1]
        assert f"Authorization: Bearer {KEYS[1]}" in shipped._targets[1][1]
        assert [d.rpm for d in shipped.deployments] == [600, 1200]
        shipped.close()
        # a fixed share per worker divides each deployment's limits
        share = LMSpec(lm, ship_api_key=True)
        share.share(4)
        assert [d["rpm"] for d in share.args["deployments"]] == [150, 300]
    finally:
        lm.close()


def test_engine_checks_deployments_and_targets():
    from semex import _engine

    with pytest.raises(ValueError, match="2 to 1000"):
        _engine.Engine(deployments=[(0.0, 0.0, 1.0, 0)])
    with pytest.raises(TypeError, match=r"deployments\[1\]"):
        _engine.Engine(deployments=[(0.0, 0.0, 1.0, 0), "x"])
    with pytest.raises(ValueError, match=r"deployments\[0\]: weight"):
        _engine.Engine(deployments=[(0.0, 0.0, 0.0, 0), (0.0, 0.0, 1.0, 0)])
    engine = _engine.Engine(deployments=[(60.0, 0.0, 1.0, 0), (0.0, 0.0, 2.0, 4)])
    try:
        with pytest.raises(ValueError, match="needs targets="):
            engine.submit("http://127.0.0.1:9/", [], [b"x"])
        with pytest.raises(ValueError, match="2 deployments"):
            engine.submit("http://127.0.0.1:9/", [], [b"x"],
                          targets=[("http://127.0.0.1:9/", [])])
        with pytest.raises(ValueError, match=r"targets\[1\] headers\[0\] contains a line"):
            engine.submit("http://127.0.0.1:9/", [], [b"x"],
                          targets=[("http://127.0.0.1:9/", []),
                                   ("http://127.0.0.1:9/", ["X: a\r\nY: b"])])
        stats = engine.stats()["deployments"]
        assert [d["window"] for d in stats] == [64, 4]
    finally:
        engine.close()
    plain = _engine.Engine()
    with pytest.raises(ValueError, match="targets= is for"):
        plain.submit("http://127.0.0.1:9/", [], [b"x"], targets=[])
    plain.close()


def test_batch_mode_refuses_several_deployments():
    lm = semex.LM("m", deployments=[("http://127.0.0.1:9/v1", "k"), ("http://127.0.0.1:10/v1",
                                                                     "k")])
    with pytest.raises(E.ConfigurationError, match="several deployments"):
        semex.llm_batch(["a"], lm, mode="batch")
    lm.close()
