"""LM over real HTTP against the fake server: order, faults, limits, auth, cancellation."""
import asyncio
import logging
import os
import signal
import threading
import time

import pytest

import semex
from semex import errors as E


def answers(prompts):
    return [f"echo: {p.split('[[')[0].strip()}" for p in prompts]


def convs(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def test_results_keep_input_order_across_2000_requests_with_random_latency(server, make_lm):
    server.configure(latency_ms=[0, 40])
    lm = make_lm(max_concurrency=500)
    prompts = [f"question {i}" for i in range(2000)]
    out = lm(convs(prompts))
    assert out.errors == [None] * 2000
    assert out.outputs == answers(prompts)
    assert out.usage.requests == 2000 and out.usage.retries == 0
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    log = server.log()
    assert len(log) == 2000
    # the latency really reordered completions at the server, so order is the client's work
    finished = sorted(log, key=lambda r: r["t_end"])
    assert [r["key"] for r in finished] != [r["key"] for r in log]


def test_every_fault_kind_is_retried_or_reported_and_nothing_is_lost(server, make_lm):
    lm = make_lm(max_retries=3, timeout=1.0, max_response_bytes=20_000)
    cases = {
        "ok plain": str,
        "retry 500 [[fail=500*2]]": str,
        "retry 502 [[fail=502*1]]": str,
        "retry 503 [[fail=503*3]]": str,
        "retry 408 [[fail=408*1]]": str,
        "retry 409 [[fail=409*1]]": str,
        "retry 429 [[fail=429*2]]": str,
        "retry drop [[drop*2]]": str,
        "retry truncate [[truncate*1]]": str,
        "retry stall [[stall*1]]": str,
        "big ok [[big=10000]]": str,
        "always 500 [[fail=500]]": E.ServerError,
        "always 429 [[fail=429]]": E.RateLimitError,
        "always drop [[drop]]": E.APIConnectionError,
        "always stall [[stall]]": E.RequestTimeoutError,
        "bad request [[fail=400]]": E.APIStatusError,
        "not found [[fail=404]]": E.APIStatusError,
        "unreadable [[badjson]]": E.ResponseFormatError,
        "too big [[big=50000]]": E.ResponseTooLargeError,
    }
    prompts = list(cases)
    out = lm(convs(prompts))
    assert len(out.outputs) == len(prompts) == len(out.errors)
    for i, (prompt, expected) in enumerate(cases.items()):
        if expected is str:
            assert out.errors[i] is None, (prompt, out.errors[i])
            if "big" in prompt:
                assert out.outputs[i] == "x" * 10000
            else:
                assert out.outputs[i] == "echo: " + prompt.split("[[")[0].strip()
        else:
            assert type(out.errors[i]) is expected, (prompt, out.errors[i])
            assert out.outputs[i] is None
            assert out.errors[i].index == i
            assert f"item {i}" in str(out.errors[i])
    # non-retryable statuses were sent exactly once; retryable ones until max_retries ran out
    attempts = {}
    for record in server.log():
        attempts[record["key"]] = max(attempts.get(record["key"], 0), record["attempt"])
    assert attempts["bad request [[fail=400]]"] == 1
    assert attempts["not found [[fail=404]]"] == 1
    assert attempts["always 500 [[fail=500]]"] == 4
    assert attempts["retry 503 [[fail=503*3]]"] == 4
    assert out.errors[prompts.index("always 500 [[fail=500]]")].attempts == 4
    assert out.usage.failed == 8


@pytest.mark.slow
def test_requests_per_minute_limit_holds_at_the_server(server, make_lm):
    lm = make_lm(rpm=600, max_concurrency=100)  # 10/s, bursts of at most 10
    prompts = [f"r{i}" for i in range(45)]
    out = lm(convs(prompts))
    assert out.outputs == answers(prompts)
    starts = sorted(r["t_start"] for r in server.log())
    # any 1-second window holds at most the burst plus one second's refill
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0)
        assert in_window <= 21, in_window
    # 45 requests at 10/s after a burst of 10 need at least 3.5 s of server time
    assert starts[-1] - starts[0] >= 3.0


@pytest.mark.slow
def test_tokens_per_minute_limit_holds_at_the_server(server, make_lm):
    # each body is ~400 bytes -> ~100 estimated tokens + max_tokens 100 = ~200 tokens;
    # 12,000 tokens/min = 200 tokens/s -> about one request per second after the burst.
    # settle_tokens=False: the estimate is the charge (the fake server's usage counts words,
    # ~4 tokens, so settled reservations would hardly pace at all: see the next test)
    lm = make_lm(tpm=12_000, max_tokens=100, max_concurrency=50, settle_tokens=False)
    prompts = [("t%d " % i) + "x" * 300 for i in range(6)]
    out = lm(convs(prompts))
    assert out.errors == [None] * 6
    starts = sorted(r["t_start"] for r in server.log())
    assert starts[-1] - starts[0] >= 3.0


def test_tokens_per_minute_settle_against_the_answers_usage(server, make_lm):
    # The same requests, settled (the default) and not, one after the other: settled, each
    # gives back all but the ~4 tokens its answer says it used, so the next one need not
    # wait for the refill; unsettled, they go about one a second after the burst.
    prompts = [("t%d " % i) + "x" * 300 for i in range(6)]
    spans = {}
    for settle in (True, False):
        lm = make_lm(tpm=12_000, max_tokens=100, max_concurrency=1, settle_tokens=settle)
        seen = len(server.log())
        out = lm(convs(prompts))
        assert out.errors == [None] * 6
        stats = lm.engine_stats()
        assert stats["tokens_settled"] == (6 if settle else 0)
        assert (stats["tokens_refunded"] > 6 * 150) == settle
        starts = sorted(r["t_start"] for r in server.log()[seen:])
        spans[settle] = starts[-1] - starts[0]
    assert spans[False] >= 3.0
    assert spans[True] * 3 < spans[False], spans


@pytest.mark.slow
def test_retry_after_hints_are_honoured(server, make_lm):
    lm = make_lm(max_retries=2, adaptive_concurrency=False)
    prompts = {
        "a [[fail=429*1]][[retry_after=1]]": 0.9,
        "b [[fail=503*1]][[retry_after_ms=400]]": 0.35,
        "c [[fail=429*1]][[reset_requests=600ms]]": 0.5,
        "d [[fail=429*1]][[retry_after_date=2]]": 0.9,
    }
    for prompt, least in prompts.items():
        server.reset()
        out = lm(convs([prompt]))
        assert out.errors == [None], prompt
        first, second = server.log()
        assert second["t_start"] - first["t_end"] >= least, prompt


def test_429_starts_a_global_cooldown_and_cuts_the_window(server, make_lm):
    lm = make_lm(max_concurrency=50, max_retries=3)
    prompts = [f"p{i} [[fail=429*1]][[retry_after=0.5]]" for i in range(50)]
    out = lm(convs(prompts))
    assert out.errors == [None] * 50
    stats = lm.engine_stats()
    assert stats["http_429"] == 50
    assert stats["window_cuts"] >= 1
    log = server.log()
    last_429 = max(r["t_end"] for r in log if r["outcome"] == 429)
    first_429 = min(r["t_end"] for r in log if r["outcome"] == 429)
    retries = [r for r in log if r["attempt"] == 2]
    assert min(r["t_start"] for r in retries) >= first_429 + 0.45
    assert out.usage.rate_limited == 50
    assert last_429 > 0


def test_bad_key_fails_the_whole_call_fast_without_retries(server, make_lm):
    lm = make_lm(api_key="sk-wrong-KEY-987654321", max_concurrency=8, max_retries=6)
    prompts = [f"q{i}" for i in range(300)]
    started = time.monotonic()
    out = lm(convs(prompts))
    elapsed = time.monotonic() - started
    assert out.outputs == [None] * 300
    kinds = {type(e) for e in out.errors}
    assert kinds <= {E.AuthenticationError, E.AbortedError}
    assert E.AuthenticationError in kinds
    # only the first window's worth of requests ever reached the server, each once
    log = server.log()
    assert len(log) <= 16
    assert all(r["attempt"] == 1 for r in log)
    assert elapsed < 5  # no backoff was slept through (6 retries x 300 would take minutes)
    assert all("sk-wrong-KEY-987654321" not in str(e) for e in out.errors)


def test_insufficient_quota_is_not_retried(server, make_lm):
    lm = make_lm(max_retries=5, max_concurrency=4)
    out = lm(convs([f"q{i} [[quota]]" for i in range(40)]))
    assert {type(e) for e in out.errors} <= {E.QuotaExceededError, E.AbortedError}
    assert E.QuotaExceededError in {type(e) for e in out.errors}
    assert len(server.log()) <= 8


def test_body_cap_fails_only_the_oversized_item(server, make_lm):
    lm = make_lm(max_response_bytes=4096)
    out = lm(convs(["small", "large [[big=100000]]", "small again"]))
    assert out.outputs[0] == "echo: small" and out.outputs[2] == "echo: small again"
    assert isinstance(out.errors[1], E.ResponseTooLargeError)
    assert "max_body" in str(out.errors[1])


def test_cancelling_the_awaiting_task_closes_its_transfers(server, make_lm):
    lm = make_lm(max_concurrency=20, timeout=30)

    async def main():
        task = asyncio.ensure_future(lm.async_call(convs([f"s{i} [[stall]]" for i in range(20)])))
        await asyncio.sleep(0.5)
        assert len(server.log()) == 20  # all twenty are at the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = server.log()
        if all(r["outcome"] == "client_closed" for r in log):
            break
        time.sleep(0.05)
    assert [r["outcome"] for r in server.log()] == ["client_closed"] * 20
    # the engine is still usable
    assert lm(convs(["after"])).outputs == ["echo: after"]


def test_ctrl_c_during_a_sync_wait_raises_promptly_and_engine_survives(server, make_lm):
    lm = make_lm(timeout=30)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lm(convs([f"s{i} [[stall]]" for i in range(5)]))
    finally:
        timer.cancel()
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.stats()["open_connections"] > 0:
        time.sleep(0.05)
    assert all(r["outcome"] == "client_closed" for r in server.log())
    assert lm(convs(["after"])).outputs == ["echo: after"]


def test_sync_call_works_inside_a_running_event_loop(server, make_lm):
    lm = make_lm()

    async def notebook_cell():
        asyncio.get_running_loop()  # a loop is running, as in Jupyter
        return semex.llm_batch(["one", "two"], model=lm)

    assert asyncio.run(notebook_cell()) == ["echo: one", "echo: two"]


def test_async_call_on_uvloop(server, make_lm):
    uvloop = pytest.importorskip("uvloop")
    lm = make_lm(max_concurrency=50)
    prompts = [f"u{i}" for i in range(200)]

    async def main():
        return await lm.async_call(convs(prompts))

    out = uvloop.run(main())
    assert out.outputs == answers(prompts)


def test_concurrent_async_calls_share_one_engine(server, make_lm):
    lm = make_lm(max_concurrency=64)

    async def main():
        groups = [[f"g{g}-{i}" for i in range(100)] for g in range(5)]
        results = await asyncio.gather(*(lm.async_call(convs(p)) for p in groups))
        return groups, results

    groups, results = asyncio.run(main())
    for prompts, out in zip(groups, results):
        assert out.outputs == answers(prompts)


def test_fork_child_gets_a_working_engine(server, make_lm):
    lm = make_lm()
    assert lm(convs(["before fork"])).outputs == ["echo: before fork"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = lm(convs(["in child"]))
            code = 0 if out.outputs == ["echo: in child"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lm(convs(["after fork"])).outputs == ["echo: after fork"]


def test_progress_callback_reaches_the_total(server, make_lm):
    lm = make_lm()
    seen = []
    lm(convs([f"p{i}" for i in range(30)]), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (30, 30)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_max_concurrent_caps_the_calls_in_flight(server, make_lm):
    server.configure(latency_ms=[30, 30])
    lm = make_lm(max_concurrency=100)
    lm(convs([f"c{i}" for i in range(60)]), max_concurrent=5)
    log = server.log()
    events = sorted([(r["t_start"], 1) for r in log] + [(r["t_end"], -1) for r in log],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    assert peak <= 5


def test_request_fields_pass_through(server, make_lm):
    lm = make_lm(extra_body={"top_p": 0.5})
    out = lm(convs(["fields"]), response_format={"type": "json_object"})
    assert out.outputs == ["echo: fields"]


def test_bad_input_is_rejected_before_any_request(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match=r"messages_batch\[1\]"):
        lm([[{"role": "user", "content": "ok"}], "not a conversation"])
    with pytest.raises(E.ConfigurationError, match=r"messages_batch\[0\]\[0\]"):
        lm([[{"content": "no role"}]])
    with pytest.raises(E.ConfigurationError, match="max_concurrency"):
        semex.LM("m", api_base=server.base_url, max_concurrency=0)
    with pytest.raises(E.ConfigurationError, match="api_base"):
        semex.LM("m", api_base="ftp://example")
    assert server.log() == []


def test_api_key_never_appears_in_repr_errors_or_logs(server, make_lm, caplog):
    caplog.set_level(logging.DEBUG, logger="semex")
    key = server.api_key
    lm = make_lm(max_retries=1, timeout=1.0)
    assert key not in repr(lm) and key not in str(lm)
    out = lm(convs(["x [[fail=400]]", "y [[fail=500]]", "z [[stall]]", "w [[badjson]]"]))
    bad = make_lm(api_key=key + "-WRONG", max_retries=1)
    out_bad = bad(convs(["q"]))
    texts = [str(e) for e in out.errors + out_bad.errors if e] + [repr(e) for e in out.errors if e]
    texts += [e.body or "" for e in out.errors + out_bad.errors if e]
    texts += [r.getMessage() for r in caplog.records] + [repr(bad), repr(lm._engine.get())]
    assert texts and not any(key in t for t in texts)
