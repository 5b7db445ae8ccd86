"""The C mock provider (benchmarks/mock/native.c) serves the native Anthropic and Gemini APIs
with their own headers, errors and rate-limit headers and refuses what each API refuses; semex
runs its fault suite against each dialect there (the benchmarks' mock, so the Anthropic rows
of benchmarks/RESULTS.md measure a client the mock has checked)."""
import json
import time
import urllib.error
import urllib.request

import pytest

import semex
from semex import errors as E

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DIALECTS = ("openai", "anthropic", "gemini")


@pytest.fixture
def start_mock(start_cmock):
    return start_cmock


def lm_for(mock, dialect, **options):
    options.setdefault("backoff_base", 0.02)
    options.setdefault("backoff_cap", 0.2)
    if dialect == "openai":
        return semex.LM("mock", api_base=mock.root + "/v1", api_key="sk-test", **options)
    return semex.LM("mock-model", provider=dialect, api_base=mock.root, api_key="sk-test",
                    **options)


def post(url, body, headers):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with _opener.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.parametrize("dialect", DIALECTS)
def test_semex_loses_nothing_through_faults_on_each_dialect(start_mock, dialect):
    mock = start_mock("--latency-ms", "2", "--fail-rate", "0.05", "--drop-rate", "0.02",
                      "--truncate-rate", "0.02", "--seed", "7")
    lm = lm_for(mock, dialect, max_concurrency=64, max_retries=8)
    try:
        prompts = [f"prompt {i}" for i in range(1500)]
        out = semex.llm_batch(prompts, model=lm, errors="objects")
        assert out == [f"echo: prompt {i}" for i in range(1500)]
        assert lm.total_usage.retries > 0 and lm.total_usage.prompt_tokens > 0
        stats = mock.stats()
        assert stats["faults_fail"] > 0 and stats["faults_drop"] > 0
    finally:
        lm.close()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_sem_extract_against_the_mock_on_each_dialect(start_mock, dialect):
    import zlib  # noqa: F401 - the mock's values are FNV hashes, recomputed below

    mock = start_mock()
    lm = lm_for(mock, dialect)
    try:
        docs = [{"text": f"ticket {i}"} for i in range(20)]
        out = semex.sem_extract(docs, lm, {"product": None, "team": "who handles it"},
                                batch_size=5, progress=False)
        assert out.errors == [None] * 20
        for i, row in enumerate(out.outputs):
            assert row["product"].startswith("product:") and row["team"].startswith("team:")
        assert len({row["product"] for row in out.outputs}) == 20
    finally:
        lm.close()


def test_the_mock_checks_what_anthropic_requires(start_mock):
    mock = start_mock()
    url = mock.root + "/v1/messages"
    key = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    ok = {"model": "m", "max_tokens": 5, "system": "s",
          "messages": [{"role": "user", "content": "hi"}]}
    status, _, body = post(url, ok, key)
    assert status == 200 and body["content"] == [{"type": "text", "text": "echo: hi"}]
    assert body["usage"]["input_tokens"] > 0 and body["stop_reason"] == "end_turn"
    assert post(url, ok, {"anthropic-version": "2023-06-01"})[0] == 401
    assert post(url, ok, {"x-api-key": "k"})[0] == 400
    no_max = {k: v for k, v in ok.items() if k != "max_tokens"}
    assert post(url, no_max, key)[2]["error"]["message"] == "max_tokens: Field required"
    status, _, body = post(url, dict(ok, messages=[{"role": "system", "content": "s"},
                                                   {"role": "user", "content": "hi"}]), key)
    assert status == 400 and body["type"] == "error" and "system" in body["error"]["message"]


def test_the_mock_checks_what_gemini_requires(start_mock):
    mock = start_mock()
    url = mock.root + "/v1beta/models/gemini-x:generateContent"
    ok = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, _, body = post(url, ok, {"x-goog-api-key": "k"})
    assert status == 200 and body["candidates"][0]["content"]["parts"] == [{"text": "echo: hi"}]
    assert body["modelVersion"] == "gemini-x"
    status, _, body = post(url, ok, {"Authorization": "Bearer k"})
    assert status == 400 and body["error"]["message"].startswith("API key not valid")
    assert post(url, {"messages": []}, {"x-goog-api-key": "k"})[0] == 400
    bad = dict(ok, generationConfig={"responseMimeType": "application/json", "responseSchema": {
        "type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "additionalProperties": False}})
    assert post(url, bad, {"x-goog-api-key": "k"})[0] == 400


@pytest.mark.parametrize("dialect", ("anthropic", "gemini"))
def test_limits_and_faults_answer_in_each_apis_words(start_mock, dialect):
    mock = start_mock("--rpm", "60", "--fail-rate", "1")
    if dialect == "anthropic":
        url, body, headers = mock.root + "/v1/messages", {
            "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, {
            "x-api-key": "k", "anthropic-version": "2023-06-01"}
    else:
        url, body, headers = mock.root + "/v1beta/models/g:generateContent", {
            "contents": [{"parts": [{"text": "x"}]}]}, {"x-goog-api-key": "k"}
    statuses = []
    for _ in range(3):
        status, hdrs, answer = post(url, body, headers)
        statuses.append(status)
        lower = {k.lower(): v for k, v in hdrs.items()}
        if status == 429:
            if dialect == "anthropic":
                assert answer["error"]["type"] == "rate_limit_error"
                assert lower["retry-after"] == "1"
                assert lower["anthropic-ratelimit-requests-remaining"] == "0"
                reset = lower["anthropic-ratelimit-requests-reset"]
                assert time.strptime(reset[:19], "%Y-%m-%dT%H:%M:%S") and reset.endswith("Z")
            else:
                assert answer["error"]["status"] == "RESOURCE_EXHAUSTED"
                info = answer["error"]["details"][0]  # when to retry: in the body
                assert info["@type"].endswith("google.rpc.RetryInfo")
                assert 0 < float(info["retryDelay"].rstrip("s")) <= 1.0
                assert not any(k.startswith(("x-ratelimit", "retry-after", "anthropic"))
                               for k in lower)
        else:  # --fail-rate 1: every admitted request fails, in the API's shape
            assert status in ((500, 529) if dialect == "anthropic" else (500, 503))
            if dialect == "anthropic":
                assert answer["type"] == "error"
            else:
                assert answer["error"]["status"] in ("INTERNAL", "UNAVAILABLE")
    assert 429 in statuses


@pytest.mark.parametrize("dialect", ("anthropic", "gemini"))
def test_semex_paces_itself_on_the_mocks_limit_in_each_dialect(start_mock, dialect):
    mock = start_mock("--rpm", "1200")  # 20/s, bursts of 20
    lm = lm_for(mock, dialect, max_concurrency=32, max_retries=20)
    try:
        started = time.monotonic()
        out = semex.llm_batch([f"p{i}" for i in range(60)], model=lm, errors="objects")
        assert out == [f"echo: p{i}" for i in range(60)]
        assert time.monotonic() - started >= 1.5  # 40 beyond the burst at 20/s
        # Anthropic's budget headers pace the engine; Gemini's 429s each carry a RetryInfo
        # delay (the mock's: until its next token, ~1/20 s), honoured as given, and hinted
        # 429s teach the scheduler no rate (sched.c), so a row may meet a couple of them.
        assert lm.total_usage.rate_limited < (60 if dialect == "anthropic" else 120)
    finally:
        lm.close()


def test_a_bad_anthropic_request_fails_its_rows_not_retried(start_mock):
    mock = start_mock()
    lm = lm_for(mock, "anthropic", max_retries=5)
    try:
        out = lm([[{"role": "assistant", "content": "only me"}]])
        assert isinstance(out.errors[0], E.APIStatusError) and out.errors[0].status == 400
        assert out.usage.requests == 1
    finally:
        lm.close()
