"""llm_batch / parallel_query: the map primitive with typed per-item errors."""
import asyncio

import pytest

import semex
from semex import errors as E


def test_llm_batch_returns_answers_in_order_and_failures_as_error_text(server, make_lm):
    lm = make_lm(max_retries=1)
    prompts = ["a", "b [[fail=404]]", "c", "d [[fail=500]]", "e"]
    result = semex.llm_batch(prompts, model=lm, max_concurrent=3)
    assert result[0] == "echo: a" and result[2] == "echo: c" and result[4] == "echo: e"
    for i, cls, status in ((1, E.APIStatusError, 404), (3, E.ServerError, 500)):
        assert isinstance(result[i], semex.ErrorText) and result[i].startswith("Error: ")
        assert isinstance(result[i].error, cls) and result[i].error.status == status
        assert result[i].error.index == i and result.errors[i] is result[i].error
    assert not isinstance(result[0], semex.ErrorText) and result.errors[0] is None


def test_llm_batch_errors_objects_and_raise(server, make_lm):
    lm = make_lm(max_retries=0)
    prompts = ["a", "b [[fail=404]]"]
    objects = semex.llm_batch(prompts, model=lm, errors="objects")
    assert objects[0] == "echo: a"
    assert isinstance(objects[1], E.APIStatusError) and not isinstance(objects[1], str)
    with pytest.raises(E.BatchError) as caught:
        semex.llm_batch(prompts, model=lm, errors="raise")
    assert caught.value.results[0] == "echo: a"  # nothing computed is lost
    assert isinstance(caught.value.errors[1], E.APIStatusError)
    with pytest.raises(E.ConfigurationError, match="errors must be"):
        semex.llm_batch(prompts, model=lm, errors="strings")


def test_llm_batch_async_matches_sync(server, make_lm):
    lm = make_lm()
    prompts = [f"n{i}" for i in range(100)]
    assert asyncio.run(semex.llm_batch_async(prompts, model=lm)) == \
        semex.llm_batch(prompts, model=lm)


def test_system_prompt_and_conversations(server, make_lm):
    lm = make_lm()
    result = semex.llm_batch(["plain", [{"role": "user", "content": "conv"}]], model=lm,
                             system_prompt="be brief")
    assert result == ["echo: plain", "echo: conv"]


def test_parallel_query_fills_the_template(server, make_lm):
    lm = make_lm()
    chunks = ["alpha", "beta {not a field}", "gamma"]
    result = semex.parallel_query("Summarize: {chunk}", chunks, model=lm)
    assert result == [f"echo: Summarize: {c}" for c in chunks]
    result = asyncio.run(semex.parallel_query_async("Q {chunk}", ["x"], model=lm))
    assert result == ["echo: Q x"]


def test_parallel_query_rejects_a_template_without_placeholder(server, make_lm):
    with pytest.raises(E.ConfigurationError, match=r"\{chunk\}"):
        semex.parallel_query("no placeholder", ["x"], model=make_lm())
    with pytest.raises(E.ConfigurationError, match=r"chunks\[1\]"):
        semex.parallel_query("{chunk}", ["x", 3], model=make_lm())
    assert server.log() == []


def test_settings_configure_supplies_the_default_model(server, make_lm, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(semex.settings, "lm", None)
    with pytest.raises(E.ConfigurationError, match="configure"):
        semex.llm_batch(["x"])
    semex.settings.configure(lm=make_lm())
    assert semex.llm_batch(["x"]) == ["echo: x"]
    with pytest.raises(E.ConfigurationError, match="unknown setting"):
        semex.settings.configure(model="x")


def test_environment_defaults(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    lm = semex.LM("env-model")
    try:
        assert lm.api_base == server.base_url
        assert semex.llm_batch(["env"], model=lm) == ["echo: env"]
    finally:
        lm.close()


def test_bad_prompts_are_rejected_before_any_request(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match=r"prompts\[2\]"):
        semex.llm_batch(["a", "b", 7], model=lm)
    with pytest.raises(E.ConfigurationError, match="single string"):
        semex.llm_batch("abc", model=lm)
    assert server.log() == []


@pytest.mark.parametrize("use_async", [False, True])
def test_max_concurrent_bounds_the_whole_call_across_windows(server, make_lm, use_async):
    # 1,500 prompts run as several engine windows (two submitted at a time); the cap is
    # the call's, so the server never sees more than 4 of them at once.
    server.reset()
    lm = make_lm(max_concurrency=64)
    prompts = [f"[[lat=2]] w{i}" for i in range(1500)]
    if use_async:
        result = asyncio.run(semex.llm_batch_async(prompts, model=lm, max_concurrent=4))
    else:
        result = semex.llm_batch(prompts, model=lm, max_concurrent=4)
    assert result == [f"echo: w{i}" for i in range(1500)]
    assert 1 <= server.stats()["max_in_flight"] <= 4


@pytest.mark.slow
@pytest.mark.parametrize("use_async", [False, True])
def test_a_slow_request_does_not_hold_back_the_windows_after_it(server, make_lm, use_async):
    # Answers are read window by window, in order. Row 0 takes 4 s; the other 2,599 rows
    # take 5 ms each, about 0.2 s of work at 64 in flight (a second or two on a loaded
    # machine, or under ASan). They must all be sent while row 0 is still out (more windows
    # submitted while its window waits), not after it.
    server.reset()
    lm = make_lm(max_concurrency=64, timeout=10.0)
    prompts = ["[[lat=4000]] slow"] + [f"[[lat=5]] r{i}" for i in range(1, 2600)]
    if use_async:
        result = asyncio.run(semex.llm_batch_async(prompts, model=lm, max_concurrent=64))
    else:
        result = semex.llm_batch(prompts, model=lm, max_concurrent=64)
    assert result == ["echo: slow"] + [f"echo: r{i}" for i in range(1, 2600)]
    log = server.log()
    slow = next(r for r in log if "slow" in r["key"])
    last_sent = max(r["t_start"] for r in log if "slow" not in r["key"])
    assert last_sent < slow["t_end"]
