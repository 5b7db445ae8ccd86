"""Token budgets settle against usage (issue 14, 1b): against the C mock's --tpm-usage limiter
(it counts what each answer used, prompt + completion tokens), an LM whose max_tokens is 8x
the typical answer runs near the limit with settle_tokens (the default) and at a fraction of
it without, each with next to no 429s; the mock's x-ratelimit-remaining-tokens and its
embeddings bucket (--embed-tpm) behave as documented. benchmarks/bench_tpm.py measures the
same at full scale."""
import json
import os
import selectors
import shutil
import subprocess
import time
import urllib.request

import pytest

import semex
from semex.errors import ConfigurationError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

TPM = 1_200_000          # 20,000 tokens/s, a burst of 20,000
PAD = "x" * 400          # answers of ~104 completion tokens (the mock echoes the prompt)
MAX_TOKENS = 8 * 104


@pytest.fixture
def mock():
    if not shutil.which("make") or not shutil.which(os.environ.get("CC", "cc")):
        pytest.fail("make and a C compiler are needed to build benchmarks/mockserver")
    build = subprocess.run(["make", "-s", "-C", BENCH], capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    procs = []

    def start(*args):
        proc = subprocess.Popen([os.path.join(BENCH, "build", "mockserver"), "--port", "0",
                                 "--stdin-watch", "--latency-ms", "20", *args],
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


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with _opener.open(req, timeout=5) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _run(base, n, settle):
    lm = semex.LM("mock", api_base=base + "/v1", api_key="sk-test", tpm=TPM,
                  max_tokens=MAX_TOKENS, settle_tokens=settle, max_concurrency=64,
                  temperature=None)
    prompts = [f"row {i} {PAD}" for i in range(n)]
    try:
        t0 = time.perf_counter()
        out = semex.llm_batch(prompts, lm, max_concurrent=64, errors="objects")
        wall = time.perf_counter() - t0
        assert list(out) == [f"echo: {p}" for p in prompts]
        engine = lm.engine_stats()
        usage = lm.total_usage
    finally:
        lm.close()
    return wall, engine, usage, _get(base + "/_stats")


@pytest.mark.timeout(180)
def test_settle_tokens_runs_near_the_limit_and_without_it_far_below(mock):
    n = 120
    new_base, old_base = mock("--tpm", str(TPM), "--tpm-usage"), \
        mock("--tpm", str(TPM), "--tpm-usage")
    new_wall, new_engine, new_usage, new_srv = _run(new_base, n, True)
    old_wall, old_engine, old_usage, old_srv = _run(old_base, n, False)
    for srv, usage in ((new_srv, new_usage), (old_srv, old_usage)):
        assert srv["responses_200"] == n
        assert srv["responses_429"] <= 0.01 * srv["requests"]
        # the mock counted what the answers said they used
        assert srv["usage_tokens"] == usage.prompt_tokens + usage.completion_tokens
    assert new_engine["tokens_settled"] == n and old_engine["tokens_settled"] == 0
    # each reservation (prompt + max_tokens, ~940) used ~220: max_tokens - the answer came back
    completion = new_usage.completion_tokens / n
    assert new_engine["tokens_refunded"] >= 0.9 * n * (MAX_TOKENS - completion)
    assert new_engine["tokens_overrun"] == 0
    assert old_engine["tokens_refunded"] == 0
    # Old reserves ~4x what is used, so its run is paced ~4x slower (net of the start
    # burst both share); settled, it is paced by what was used.
    assert new_wall * 2 < old_wall, (new_wall, old_wall)


def test_settle_tokens_must_be_a_bool():
    with pytest.raises(ConfigurationError, match="settle_tokens"):
        semex.LM("mock", api_base="http://127.0.0.1:9/v1", api_key="k", settle_tokens="yes")


def test_mock_tpm_usage_counts_the_answer_and_embeddings_have_their_own_bucket(mock):
    base = mock("--tpm", "6000", "--tpm-usage", "--embed-tpm", "60000")  # 100 and 1000/s
    chat = {"model": "m", "messages": [{"role": "user", "content": "y" * 200}]}
    status, headers, body = _post(base + "/v1/chat/completions", chat)
    assert status == 200
    used = body["usage"]["total_tokens"]
    # admitted for its prompt (body bytes/4) and then charged its completion too
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100 - (body["usage"]["prompt_tokens"] - 1)
    # the completion's charge left the bucket in debt: the next chat request is refused
    status, headers, _ = _post(base + "/v1/chat/completions", chat)
    assert status == 429 and int(headers["x-ratelimit-remaining-tokens"]) == 0
    # ... while embeddings draw on their own bucket
    status, headers, emb = _post(base + "/v1/embeddings", {"model": "e", "input": "z" * 200})
    assert status == 200
    assert int(headers["x-ratelimit-limit-tokens"]) == 60000
    srv = _get(base + "/_stats")
    assert srv["usage_tokens"] == used
    assert srv["embed_usage_tokens"] == emb["usage"]["total_tokens"]


def test_answers_read_in_python_and_embeddings_settle_too(server, make_lm):
    """The worker settles the answers it reads; an answer it leaves to json.loads (here a
    repeated "content" key on the path it reads) is settled when Python has read it, and an
    embeddings answer when its usage has been read: every request settles exactly once."""
    import base64

    from conftest import client_factory

    def raw(content, total):
        body = ('{"choices": [{"message": {"role": "assistant", "content": "x", '
                f'"content": "{content}"}}, "finish_reason": "stop"}}], "usage": '
                f'{{"prompt_tokens": {total - 2}, "completion_tokens": 2, '
                f'"total_tokens": {total}}}}}')
        return "[[rawb64=" + base64.urlsafe_b64encode(body.encode()).decode() + "]]"

    lm = make_lm(tpm=6_000_000, max_tokens=4000)
    prompts = [f"p{i} " + raw(f"answer {i}", 10 + i) for i in range(6)] + ["plain a", "b"]
    out = semex.llm_batch(prompts, model=lm, progress=False)
    assert list(out[:6]) == [f"answer {i}" for i in range(6)]
    assert list(out[6:]) == ["echo: plain a", "echo: b"]
    stats = lm.engine_stats()
    assert stats["tokens_settled"] == 8  # 6 read in Python, 2 by the worker
    # each reservation held max_tokens=4000 + characters/4; the answers used 10-15 tokens
    assert stats["tokens_refunded"] > 8 * 3900
    again = semex.llm_batch(prompts[:2], model=lm, progress=False)
    assert list(again) == [f"answer {i}" for i in range(2)] and lm.engine_stats()["tokens_settled"] == 10

    gen = client_factory(server, lambda **o: semex.EmbeddingModel("test-embed", **o),
                         0.02, 0.2)
    make_rm = next(gen)
    try:
        rm = make_rm(tpm=6_000_000, max_batch_inputs=4)
        texts = [f"document {i} " + "words " * 50 for i in range(10)]
        vectors = semex.embed(texts, rm, progress=False)
        assert vectors.shape[0] == 10
        estats = rm.engine_stats()
        assert estats["tokens_settled"] == 3  # one per request of 4, 4 and 2 inputs
        assert estats["tokens_refunded"] + estats["tokens_overrun"] > 0
    finally:
        next(gen, None)
