"""The native provider dialects (Anthropic Messages, Gemini generateContent) over real HTTP.

The fake server (tests/fakeserver.py) serves each API with its own paths, key headers, error
shapes and rate-limit headers, and refuses what the real API refuses (a "system" role in
Anthropic's messages, no max_tokens, no anthropic-version, a missing Gemini key header): a
request semex writes wrongly fails these tests. The fault suite runs on every dialect, OpenAI's
included, through the `dialect` fixture (tests/conftest.py).
"""
import base64
import enum
import json
import time
from typing import List, Optional

import pytest
from pydantic import BaseModel

import semex
from semex import errors as E
from semex.providers.gemini import response_schema


def convs(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def _hdrs(*lines: str) -> str:
    raw = "\n".join(lines).encode("latin-1")
    return "[[hdrb64=" + base64.urlsafe_b64encode(raw).decode() + "]]"


def _raw(body: bytes) -> str:
    return "[[rawb64=" + base64.urlsafe_b64encode(body).decode() + "]]"


def chat_log(server):
    return [r for r in server.log() if r.get("key") is not None]


# -- the fault suite, on each dialect -----------------------------------------------------------
def test_every_fault_kind_is_retried_or_reported_on_each_dialect(server, make_dialect_lm,
                                                                 dialect):
    lm = make_dialect_lm(max_retries=3, timeout=1.0, max_response_bytes=20_000)
    overloaded = 529 if dialect == "anthropic" else 503
    cases = {
        "ok plain": str,
        "retry 500 [[fail=500*2]]": str,
        f"retry overloaded [[fail={overloaded}*2]]": str,
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
        "unreadable [[badjson]]": E.ResponseFormatError,
        "too big [[big=50000]]": E.ResponseTooLargeError,
    }
    prompts = list(cases)
    out = lm(convs(prompts))
    for i, (prompt, expected) in enumerate(cases.items()):
        if expected is str:
            assert out.errors[i] is None, (prompt, out.errors[i])
            want = "x" * 10000 if "big" in prompt else \
                "echo: " + prompt.split("[[")[0].strip()
            assert out.outputs[i] == want
        else:
            assert type(out.errors[i]) is expected, (prompt, out.errors[i])
            assert out.outputs[i] is None and out.errors[i].index == i
    attempts = {}
    for record in chat_log(server):
        assert record["dialect"] == dialect
        attempts[record["key"]] = max(attempts.get(record["key"], 0), record["attempt"])
    assert attempts["bad request [[fail=400]]"] == 1
    assert attempts["always 500 [[fail=500]]"] == 4
    assert attempts[f"retry overloaded [[fail={overloaded}*2]]"] == 3
    assert out.usage.failed == 7
    # the provider's own words reach the error
    bad = out.errors[prompts.index("bad request [[fail=400]]")]
    assert "Invalid request." in str(bad)
    if dialect == "anthropic":
        assert json.loads(bad.body)["error"]["type"] == "invalid_request_error"
    elif dialect == "gemini":
        assert json.loads(bad.body)["error"]["status"] == "INVALID_ARGUMENT"


def test_a_bad_key_fails_the_whole_call_fast_on_each_dialect(server, make_dialect_lm,
                                                            dialect):
    lm = make_dialect_lm(api_key="sk-wrong-KEY-987654321", max_concurrency=8, max_retries=6)
    started = time.monotonic()
    out = lm(convs([f"q{i}" for i in range(200)]))
    assert time.monotonic() - started < 5
    kinds = {type(e) for e in out.errors}
    assert kinds <= {E.AuthenticationError, E.AbortedError} and E.AuthenticationError in kinds
    log = server.log()
    assert 1 <= len(log) <= 16 and all(r["attempt"] <= 1 for r in log)
    # Gemini says 400 "API key not valid", not 401
    assert {r["outcome"] for r in log} == {400 if dialect == "gemini" else 401}
    assert all("sk-wrong-KEY-987654321" not in str(e) for e in out.errors)


def test_retry_hints_are_honoured_in_each_dialects_own_words(server, make_dialect_lm,
                                                             dialect):
    """Anthropic: retry-after in seconds; Gemini: no header, a RetryInfo retryDelay in the
    error body."""
    lm = make_dialect_lm(max_retries=2, adaptive_concurrency=False)
    out = lm(convs(["a [[fail=429*1]][[retry_after_ms=700]]"]))
    assert out.errors == [None]
    first, second = chat_log(server)
    gap = second["t_start"] - first["t_end"]
    if dialect == "anthropic":
        assert gap >= 0.9  # 700 ms is "retry-after: 1" in Anthropic's whole seconds
    else:  # OpenAI's retry-after-ms; Gemini's RetryInfo "retryDelay": "0.7s" in the body
        assert gap >= 0.6


@pytest.mark.parametrize("dialect", ["anthropic"], indirect=True)
def test_anthropic_rate_limit_headers_pause_the_scheduler(server, make_dialect_lm, dialect):
    lm = make_dialect_lm(max_concurrency=4)
    reset = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1.6)) + "Z"
    gone = _hdrs("anthropic-ratelimit-requests-limit: 1",
                 "anthropic-ratelimit-requests-remaining: 0",
                 f"anthropic-ratelimit-requests-reset: {reset}")
    assert lm(convs([gone + " first"])).errors == [None]
    assert lm.engine_stats()["cooldowns"] == 1
    out = lm(convs(["second"]))
    assert out.outputs == ["echo: second"]
    first, second = chat_log(server)
    assert second["t_start"] - first["t_end"] >= 0.5  # the reset's date was believed
    # A date that is not RFC 3339 is no hint.
    server.reset()
    lm(convs([_hdrs("anthropic-ratelimit-requests-remaining: 0",
                    "anthropic-ratelimit-requests-reset: tomorrow") + " third"]))
    assert lm.engine_stats()["cooldowns"] == 1


# -- what each API requires ---------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["anthropic", "gemini"], indirect=True)
def test_requests_carry_what_each_native_api_requires(server, make_dialect_lm, dialect):
    lm = make_dialect_lm(max_tokens=77, temperature=0.5)
    out = lm([[{"role": "system", "content": "be brief"},
               {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "again"}]])
    assert out.outputs == ["echo: again"], out.errors
    out = semex.llm_batch(["plain"], model=lm, system_prompt="sys")
    assert out == ["echo: plain"]
    first, second = chat_log(server)
    for record in (first, second):
        assert record["auth_header"] == ("x-api-key" if dialect == "anthropic"
                                         else "x-goog-api-key")
    native = first["native"]
    if dialect == "anthropic":
        assert first["path"] == "/v1/messages"
        assert first["headers_seen"]["anthropic-version"] == "2023-06-01"
        assert native["system"] == "be brief" and native["max_tokens"] == 77
        assert [m["role"] for m in native["messages"]] == ["user", "assistant", "user"]
        assert native["temperature"] == 0.5 and native["model"] == "test-model"
        assert second["native"]["system"] == "sys"
    else:
        assert first["path"] == "/v1beta/models/test-model:generateContent"
        assert native["systemInstruction"] == {"parts": [{"text": "be brief"}]}
        assert [c["role"] for c in native["contents"]] == ["user", "model", "user"]
        assert native["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 77}
        assert "model" not in native and "messages" not in native
        assert second["native"]["systemInstruction"] == {"parts": [{"text": "sys"}]}


@pytest.mark.parametrize("dialect", ["anthropic"], indirect=True)
def test_anthropic_always_sends_max_tokens(server, make_dialect_lm, dialect):
    lm = make_dialect_lm()
    assert lm(convs(["x"])).outputs == ["echo: x"]
    assert chat_log(server)[0]["native"]["max_tokens"] == 4096
    assert semex.llm_batch(["y"], model=lm, max_tokens=9) == ["echo: y"]
    assert chat_log(server)[1]["native"]["max_tokens"] == 9


def test_the_fake_server_refuses_what_the_real_apis_refuse(server):
    """The checks the suite relies on are live: a wrongly written request fails."""
    import urllib.error
    import urllib.request

    root = server._root
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(path, body, headers):
        req = urllib.request.Request(root + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    key = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01"}
    ok = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert post("/v1/messages", ok, key)[0] == 200
    status, body = post("/v1/messages", dict(ok, messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]), key)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "system" in body["error"]["message"]
    assert post("/v1/messages", {k: v for k, v in ok.items() if k != "max_tokens"},
                key)[0] == 400
    assert post("/v1/messages", ok, {"x-api-key": server.api_key})[0] == 400
    assert post("/v1/messages", ok, {"Authorization": "Bearer " + server.api_key,
                                     "anthropic-version": "2023-06-01"})[0] == 401
    g = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    path = "/v1beta/models/m:generateContent"
    assert post(path, g, {"x-goog-api-key": server.api_key})[0] == 200
    status, body = post(path, g, {"Authorization": "Bearer " + server.api_key})
    assert status == 400 and body["error"]["message"].startswith("API key not valid")
    assert post(path, {"messages": []}, {"x-goog-api-key": server.api_key})[0] == 400
    bad_schema = dict(g, generationConfig={"responseMimeType": "application/json",
                                           "responseSchema": {"type": "OBJECT",
                                                              "additionalProperties": False}})
    assert post(path, bad_schema, {"x-goog-api-key": server.api_key})[0] == 400


# -- answers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["anthropic", "gemini"], indirect=True)
def test_blocked_answers_are_that_rows_typed_error(server, make_dialect_lm, dialect):
    lm = make_dialect_lm(max_retries=3)
    prompts = ["fine", "bad [[blocked=SAFETY]]", "fine too"]
    if dialect == "gemini":
        prompts += ["worse [[prompt_blocked=PROHIBITED_CONTENT]]", "cited [[blocked=RECITATION]]"]
    out = lm(convs(prompts))
    assert out.outputs[0] == "echo: fine" and out.outputs[2] == "echo: fine too"
    for i in range(1, len(prompts)):
        if i == 2:
            continue
        assert type(out.errors[i]) is E.ContentBlockedError, out.errors[i]
        assert out.outputs[i] is None
    assert out.finish_reasons[1] == ("refusal" if dialect == "anthropic" else "SAFETY")
    if dialect == "gemini":
        assert out.finish_reasons[3] == "PROHIBITED_CONTENT"
    attempts = [r["attempt"] for r in chat_log(server)]
    assert attempts == [1] * len(prompts)  # never retried
    texts = semex.llm_batch(["x [[blocked=SAFETY]]"], model=lm)
    assert texts[0].startswith("Error:") and "withheld" in texts[0]


def test_text_pieces_are_joined_and_thoughts_left_out(server, make_dialect_lm, dialect):
    lm = make_dialect_lm()
    out = lm(convs(["several pieces here [[parts]]"]))
    assert out.outputs == ["echo: several pieces here"]
    assert out.usage.completion_tokens == 5 + (2 if dialect == "gemini" else 0)


def test_usage_is_mapped_from_each_dialects_counts(server, make_dialect_lm, dialect):
    lm = make_dialect_lm(input_price_per_million=1.0, output_price_per_million=2.0)
    out = lm(convs(["one two three", "four [[cache_tokens]]"]))
    assert out.errors == [None, None]
    # the fake counts words + 1 both ways; cache tokens are prompt tokens too
    assert out.usage.prompt_tokens == 4 + 3 and out.usage.completion_tokens == 5 + 3
    assert out.usage.total_tokens == 15
    assert out.usage.cost == pytest.approx((7 * 1.0 + 8 * 2.0) / 1e6)
    assert lm.total_usage.prompt_tokens == 7


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"], indirect=True)
def test_answers_the_engine_leaves_to_python_read_the_same(server, make_dialect_lm, dialect):
    """A body the C reader falls back on (a duplicate key) is read by the dialect's Python
    reader, with json.loads' meaning (the last key wins)."""
    if dialect == "anthropic":
        fast = b'{"content":[{"type":"text","text":"A\\u00e9"}],"stop_reason":"end_turn",' \
               b'"usage":{"input_tokens":2,"output_tokens":3}}'
        slow = b'{"content":[],"content":[{"type":"text","text":"A\\u00e9"}],' \
               b'"stop_reason":"end_turn","usage":{"input_tokens":2,"output_tokens":3}}'
    else:
        fast = b'{"candidates":[{"content":{"parts":[{"text":"A\\u00e9"}]},' \
               b'"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":2,' \
               b'"candidatesTokenCount":3,"totalTokenCount":5}}'
        slow = b'{"candidates":[{"content":{"parts":[{"text":"A\\u00e9"}]},' \
               b'"finishReason":"X","finishReason":"STOP"}],"usageMetadata":{' \
               b'"promptTokenCount":2,"candidatesTokenCount":3,"totalTokenCount":5}}'
    lm = make_dialect_lm()
    out = lm(convs([_raw(fast) + " f", _raw(slow) + " s"]))
    assert out.outputs == ["A\u00e9", "A\u00e9"], out.errors
    assert out.finish_reasons[0] == out.finish_reasons[1]
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 6


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"], indirect=True)
def test_streaming_is_refused_before_anything_is_sent(server, make_dialect_lm, dialect):
    lm = make_dialect_lm()
    with pytest.raises(E.ConfigurationError, match="not supported with provider"):
        lm(convs(["x"]), stream=True)
    with pytest.raises(E.ConfigurationError, match="not supported with provider"):
        lm(convs(["x"]), on_chunk=lambda i, t: None)
    assert chat_log(server) == []


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"], indirect=True)
def test_bad_input_for_a_dialect_is_refused_before_anything_is_sent(server, make_dialect_lm,
                                                                   dialect):
    lm = make_dialect_lm()
    with pytest.raises(E.ConfigurationError, match="temperature"):
        lm(convs(["x"]), temperature=2.5)
    with pytest.raises(E.ConfigurationError, match="n > 1"):
        lm(convs(["x"]), n=2)
    with pytest.raises(E.ConfigurationError, match=r"messages_batch\[0\]\[0\].*role 'tool'"):
        lm([[{"role": "tool", "content": "x"}]])
    with pytest.raises(E.ConfigurationError, match=r"messages_batch\[1\] has no user"):
        lm([[{"role": "user", "content": "x"}], [{"role": "system", "content": "s"}]])
    with pytest.raises(E.ConfigurationError, match="logit_bias"):
        lm(convs(["x"]), logit_bias={"1": 2})
    assert chat_log(server) == []


# -- everything above the provider layer ------------------------------------------------------------
FIELDS = {"sentiment": "positive/negative/neutral", "product": None}


def expected_row(doc_id):
    return {"sentiment": f"sentiment:{doc_id}", "product": f"product:{doc_id}"}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_sem_extract_on_each_dialect(server, make_dialect_lm, dialect, batch_size):
    lm = make_dialect_lm()
    texts = [f"doc {i}" for i in range(10)]
    texts[3] += " [[fence]]"
    out = semex.sem_extract([{"text": t} for t in texts], lm, FIELDS, batch_size=batch_size,
                            progress=False)
    assert out.errors == [None] * 10
    assert out.outputs == [expected_row(f"doc {i}") for i in range(10)]
    log = chat_log(server)
    if dialect == "anthropic":  # structured output through a forced tool
        native = log[0]["native"]
        assert native["tool_choice"]["type"] == "tool"
        assert native["tools"][0]["name"] == native["tool_choice"]["name"]
        assert native["tools"][0]["input_schema"]["type"] == "object"
        assert "response_format" not in native
    elif dialect == "gemini":
        config = log[0]["native"]["generationConfig"]
        assert config["responseMimeType"] == "application/json"
        assert config["responseSchema"]["type"] == "OBJECT"
        assert "additionalProperties" not in json.dumps(config)


class Mood(enum.Enum):
    happy = "happy"
    sad = "sad"


class Part(BaseModel):
    name: str
    count: int


class Ticket(BaseModel):
    mood: Mood
    urgent: bool
    parts: List[str]
    main_part: Optional[Part] = None
    note: Optional[str] = None


def test_sem_extract_with_a_pydantic_model_on_each_dialect(server, make_dialect_lm, dialect):
    lm = make_dialect_lm()
    out = semex.sem_extract([{"text": "engine and brakes"}, {"text": "wheel"}], lm, Ticket,
                            batch_size=2, progress=False)
    assert out.errors == [None, None], out.errors
    assert out.outputs[0]["parts"] == ["engine", "and", "brakes"]
    assert out.outputs[1]["mood"] in ("happy", "sad")
    assert isinstance(out.outputs[0]["urgent"], bool)
    assert out.outputs[0]["main_part"]["count"] == len("engine and brakes")


def test_llm_batch_parallel_query_and_the_accessor_on_each_dialect(server, make_dialect_lm,
                                                                   dialect):
    import pandas as pd

    lm = make_dialect_lm()
    assert semex.llm_batch(["a", "b [[fail=400]]", "c"], model=lm) [::2] == ["echo: a",
                                                                             "echo: c"]
    assert semex.parallel_query("Q: {chunk}", ["x", "y"], model=lm) == ["echo: Q: x",
                                                                        "echo: Q: y"]
    df = pd.DataFrame({"text": ["one", "two"]})
    with semex.settings.context(lm=lm) if hasattr(semex.settings, "context") else _configured(
            lm):
        got = df.sem_extract(["text"], {"product": None}, progress=False)
    assert list(got["product"]) == ["product:one", "product:two"]


class _configured:
    def __init__(self, lm):
        self.lm = lm

    def __enter__(self):
        semex.settings.configure(lm=self.lm)

    def __exit__(self, *exc):
        semex.settings.configure(lm=None)


# -- configuration ------------------------------------------------------------------------------
def test_native_providers_from_prefixes_arguments_and_the_environment(monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "GEMINI_API_KEY", "GOOGLE_API_KEY",
                 "GEMINI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(E.ConfigurationError, match="ANTHROPIC_API_KEY"):
        semex.LM("anthropic/claude-3-5-haiku-latest")
    with pytest.raises(E.ConfigurationError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        semex.LM("gemini-2.5-flash", provider="gemini")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-SECRET")
    lm = semex.LM("anthropic/claude-3-5-haiku-latest")
    assert lm.provider == "anthropic" and lm.model == "claude-3-5-haiku-latest"
    assert lm.url == "https://api.anthropic.com/v1/messages"
    assert "x-api-key: sk-ant-SECRET" in lm._headers
    assert "anthropic-version: 2023-06-01" in lm._headers
    assert "sk-ant-SECRET" not in repr(lm)
    assert lm.input_price_per_million == 0.80  # semex.pricing knows the model
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://gateway.example/anthropic/")
    assert semex.LM("claude-3-haiku", provider="anthropic").url == \
        "https://gateway.example/anthropic/v1/messages"
    monkeypatch.setenv("GOOGLE_API_KEY", "g-key")
    g = semex.LM("gemini/gemini-2.5-flash")
    assert g.url == ("https://generativelanguage.googleapis.com/v1beta/models/"
                     "gemini-2.5-flash:generateContent")
    assert "x-goog-api-key: g-key" in g._headers
    monkeypatch.setenv("GEMINI_API_KEY", "g-key-2")
    assert "x-goog-api-key: g-key-2" in semex.LM("gemini/gemini-2.5-flash")._headers
    assert semex.LM("models/gemini-2.0-flash", provider="gemini",
                    api_base="http://10.0.0.5:8080/v1beta").url == \
        "http://10.0.0.5:8080/v1beta/models/gemini-2.0-flash:generateContent"
    with pytest.raises(E.ConfigurationError, match="names the provider 'gemini'"):
        semex.LM("gemini/x", provider="anthropic")
    with pytest.raises(E.ConfigurationError, match="provider must be one of"):
        semex.LM("x", provider="cohere")
    with pytest.raises(E.ConfigurationError, match="api_version is for provider='azure'"):
        semex.LM("claude", provider="anthropic", api_version="2024-01-01")


# -- Gemini's schema subset ------------------------------------------------------------------------
def test_json_schema_becomes_geminis_openapi_subset():
    schema = Ticket.model_json_schema()
    converted = response_schema(schema)
    text = json.dumps(converted)
    for word in ("$ref", "$defs", "additionalProperties", "default", '"null"'):
        assert word not in text, word
    props = converted["properties"]
    assert converted["type"] == "OBJECT"
    assert converted["propertyOrdering"] == ["mood", "urgent", "parts", "main_part", "note"]
    assert props["mood"] == {"type": "STRING", "enum": ["happy", "sad"], "title": "Mood"}
    assert props["urgent"]["type"] == "BOOLEAN"
    assert props["parts"]["items"] == {"type": "STRING"}
    assert props["main_part"]["nullable"] is True
    assert props["main_part"]["properties"]["count"]["type"] == "INTEGER"
    assert props["note"] == {"type": "STRING", "nullable": True, "title": "Note"}
    assert set(converted["required"]) == {"mood", "urgent", "parts"}
    assert response_schema({"type": "object", "properties": {
        "x": {"type": ["string", "null"], "format": "email"},
        "y": {"type": ["integer", "string"]},
        "z": {"const": "fixed"}, "w": {"enum": [1, 2], "type": "integer"}},
        "additionalProperties": False})["properties"] == {
        "x": {"type": "STRING", "nullable": True},
        "y": {"anyOf": [{"type": "INTEGER"}, {"type": "STRING"}]},
        "z": {"type": "STRING", "enum": ["fixed"]},
        "w": {"type": "INTEGER"}}


def test_a_recursive_model_is_refused_for_gemini_before_sending():
    class Node(BaseModel):
        value: int
        children: List["Node"] = []

    with pytest.raises(E.ConfigurationError, match="refers to itself"):
        response_schema(Node.model_json_schema())
    with pytest.raises(E.ConfigurationError, match="does not resolve"):
        response_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}})


def test_deployments_of_a_native_provider_share_its_dialect(server):
    lm = semex.LM("test-model", deployments=[
        {"api_base": server._root + "/east", "api_key": server.api_key, "provider": "gemini"},
        {"api_base": server._root + "/west", "api_key": server.api_key, "provider": "gemini"},
    ], max_concurrency=8, backoff_base=0.05)
    try:
        out = semex.llm_batch([f"q{i}" for i in range(40)], model=lm)
        assert out == [f"echo: q{i}" for i in range(40)]
        paths = {r["path"].split("/v1beta")[0] for r in server.log()}
        assert paths == {"/east", "/west"}
        assert all(r["auth_header"] == "x-goog-api-key" for r in server.log())
    finally:
        lm.close()
    with pytest.raises(E.ConfigurationError, match="one wire format"):
        semex.LM("m", deployments=[
            {"api_base": server._root, "api_key": "k", "provider": "anthropic"},
            {"api_base": server.base_url, "api_key": "k"}])


@pytest.mark.parametrize("dialect", ["anthropic"], indirect=True)
def test_anthropic_system_blocks_keep_cache_control(server, make_dialect_lm, dialect):
    """Prompt caching: system text given as Anthropic's blocks goes out as blocks, its
    cache_control kept; plain text stays one string."""
    cached = {"type": "text", "text": "a long shared preamble",
              "cache_control": {"type": "ephemeral"}}
    lm = make_dialect_lm(extra_body={"system": [cached]})
    assert semex.llm_batch(["q [[cache_tokens]]"], model=lm, system_prompt="be brief") == \
        ["echo: q"]
    out = lm([[{"role": "system", "content": [{"type": "text", "text": "row rules",
                                               "cache_control": {"type": "ephemeral"}}]},
               {"role": "user", "content": "r"}]])
    assert out.outputs == ["echo: r"] and out.usage.prompt_tokens > 0
    first, second = chat_log(server)
    assert first["native"]["system"] == [cached, {"type": "text", "text": "be brief"}]
    assert second["native"]["system"][0] == cached
    assert second["native"]["system"][1]["cache_control"] == {"type": "ephemeral"}
    plain = make_dialect_lm()
    plain([[{"role": "system", "content": [{"type": "text", "text": "a"}]},
            {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]])
    assert chat_log(server)[-1]["native"]["system"] == "a\n\nb"
    with pytest.raises(E.ConfigurationError, match="text blocks only"):
        plain([[{"role": "system", "content": [{"type": "image"}]},
                {"role": "user", "content": "c"}]])
