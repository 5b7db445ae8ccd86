"""Hostile or broken server hints cannot stall the engine (issue 14, section 2b).

Every response here comes over real HTTP from the fake server, with the exact header lines
([[hdrb64=...]]) or body bytes ([[rawb64=...]]) under test. A hint asking for longer than
LM(max_hint_wait=...) is ignored as if absent; a header value its grammar does not allow is no
hint; a body too deep for json.loads fails its own row, not the call.
"""
import base64
import json
import sys

import pytest

from semex import errors as E


def _hdrs(*lines: str) -> str:
    raw = "\n".join(lines).encode("latin-1")
    return "[[hdrb64=" + base64.urlsafe_b64encode(raw).decode() + "]]"


def _raw(body: bytes, status: int = 200) -> str:
    key = "[[rawb64=" + base64.urlsafe_b64encode(body).decode() + "]]"
    return key + (f"[[rawstatus={status}]]" if status != 200 else "")


def _ask(lm, *keys):
    return lm([[{"role": "user", "content": k}] for k in keys])


def _cooldowns(lm) -> int:
    return lm.engine_stats()["cooldowns"]


@pytest.mark.timeout(60)
def test_an_exhausted_budget_with_an_absurd_reset_does_not_stall_the_next_batch(make_lm):
    lm = make_lm()
    gone = _hdrs("x-ratelimit-remaining-requests: 0", "x-ratelimit-reset-requests: 99999999h")
    out = _ask(lm, gone + " first", "plain")
    assert out.errors == [None, None]
    assert _cooldowns(lm) == 0
    out = _ask(lm, "next batch")       # would wait ~11,000 years if the reset were believed
    assert out.errors == [None]
    assert out.outputs == ["echo: next batch"]
    assert _cooldowns(lm) == 0
    # The same header with a sane reset is believed: the mechanism under test is live.
    _ask(lm, _hdrs("x-ratelimit-remaining-requests: 0", "x-ratelimit-reset-requests: 20ms")
         + " sane")
    assert _cooldowns(lm) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("header", [
    "Retry-After: Fri, 31 Dec 9999 23:59:59 GMT",
    "retry-after-ms: 99999999999999",
    "Retry-After: 100000000",
])
def test_a_429_asking_for_years_retries_on_our_own_backoff(make_lm, header):
    lm = make_lm(max_retries=2)
    out = _ask(lm, _hdrs(header) + "[[fail=429*1]] x", "y")
    assert out.errors == [None, None]
    assert out.outputs[0] == "echo: x"


@pytest.mark.timeout(60)
def test_a_row_that_runs_out_of_retries_says_the_hint_was_ignored(make_lm):
    lm = make_lm(max_retries=1, max_hint_wait=5)
    out = _ask(lm, _hdrs("Retry-After: 3600") + "[[fail=429]] x", "fine")
    assert out.errors[1] is None
    err = out.errors[0]
    assert isinstance(err, E.RateLimitError)
    assert "max_hint_wait=5 s" in str(err) and "3600" in str(err)
    assert err.attempts == 2


@pytest.mark.timeout(60)
def test_a_hint_within_max_hint_wait_is_still_honoured(make_lm, server):
    lm = make_lm(max_retries=1, max_hint_wait=5)
    out = _ask(lm, _hdrs("Retry-After: 1") + "[[fail=429*1]] x")
    assert out.errors == [None]
    log = [r for r in server.log() if r["key"] and r["key"].endswith(" x")]
    assert len(log) == 2
    assert log[1]["t_start"] - log[0]["t_end"] >= 0.95   # the server's 1 s, not our 50 ms
    assert _cooldowns(lm) >= 1


@pytest.mark.parametrize("header", [
    "retry-after-ms: 4000s",      # was read as 4 s (4000 "seconds" taken as milliseconds)
    "retry-after-ms: 4e3",
    "Retry-After: +5",
    "Retry-After: 5s",
    "Retry-After: 5 5",
])
@pytest.mark.timeout(60)
def test_retry_after_values_outside_the_grammar_are_ignored(make_lm, server, header):
    """A 429 with one of these waits our own backoff (50 ms base), not what a lenient
    reading would make of it. (An embedded NUL, "Retry-After: 5\0garbage", is refused by
    libcurl before it reaches us; tests/c covers the parser's refusal of it.)"""
    lm = make_lm(max_retries=1)
    out = _ask(lm, _hdrs(header) + "[[fail=429*1]] x")
    assert out.errors == [None]
    log = [r for r in server.log() if r["key"] and r["key"].endswith(" x")]
    assert len(log) == 2
    assert log[1]["t_start"] - log[0]["t_end"] < 3.0


@pytest.mark.parametrize("header", [
    "x-ratelimit-remaining-requests: -0",   # was read as 0: a 30 s pause on a 200
    "x-ratelimit-remaining-requests: +0",
    "x-ratelimit-remaining-requests: 0x0",
])
@pytest.mark.timeout(60)
def test_remaining_counts_outside_the_grammar_are_ignored(make_lm, header):
    lm = make_lm()
    out = _ask(lm, _hdrs(header, "x-ratelimit-reset-requests: 30s") + " x")
    assert out.errors == [None]
    assert _cooldowns(lm) == 0
    _ask(lm, _hdrs("x-ratelimit-remaining-requests: 0", "x-ratelimit-reset-requests: 10ms")
         + " y")
    assert _cooldowns(lm) == 1


def test_max_hint_wait_is_checked_early(make_lm):
    with pytest.raises(E.ConfigurationError, match="max_hint_wait"):
        make_lm(max_hint_wait=-1)
    with pytest.raises(E.ConfigurationError, match="max_hint_wait"):
        make_lm(max_hint_wait="soon")


DEEP = (b'{"choices": [{"message": {"content": "x"}}], "deep": '
        + b"[" * 100000 + b"]" * 100000 + b"}")


@pytest.mark.timeout(60)
def test_a_success_body_too_deep_for_json_loads_fails_only_its_row(make_lm):
    lm = make_lm(max_retries=0)
    out = _ask(lm, "before", _raw(DEEP), "after")
    assert out.outputs[0] == "echo: before" and out.outputs[2] == "echo: after"
    assert out.errors[0] is None and out.errors[2] is None
    assert isinstance(out.errors[1], E.ResponseFormatError)
    assert "RecursionError" in str(out.errors[1])


@pytest.mark.timeout(60)
def test_an_error_body_too_deep_for_json_loads_still_gives_the_row_its_error(make_lm):
    lm = make_lm(max_retries=0)
    out = _ask(lm, _raw(b'{"error": ' + b"[" * 100000 + b"]" * 100000 + b"}", status=400), "ok")
    assert out.errors[1] is None
    assert isinstance(out.errors[0], E.RequestError)
    assert out.errors[0].status == 400


def _int_body(digits: int) -> bytes:
    return (b'{"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}], "n": '
            + b"7" * digits + b"}")


@pytest.mark.timeout(60)
def test_long_integers_agree_with_json_loads_under_the_interpreter_int_limit(make_lm):
    """chatjson leaves integers of more than 640 digits (the lowest limit Python can be set
    to) to json.loads, so its verdict follows sys.get_int_max_str_digits() at run time."""
    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("this Python has no int digit limit (it came in 3.11, 3.10.7 and 3.9.14)")
    lm = make_lm(max_retries=0)
    old = sys.get_int_max_str_digits()
    try:
        for limit in (640, 700, 0):
            sys.set_int_max_str_digits(limit)
            for digits in (640, 641, 699, 701, 5000):
                body = _int_body(digits)
                try:
                    json.loads(body)
                    expected_ok = True
                except ValueError:
                    expected_ok = False
                out = _ask(lm, _raw(body))
                assert (out.errors[0] is None) == expected_ok, (limit, digits)
                if not expected_ok:
                    assert isinstance(out.errors[0], E.ResponseFormatError)
    finally:
        sys.set_int_max_str_digits(old)
