"""Streamed answers (stream=True, server-sent events) over real HTTP against the fake server:
same results as whole answers, on_chunk deltas, cut streams, error events, cancellation."""
import asyncio
import base64
import json
import os
import signal
import threading
import time

import pytest

import semex
from semex import errors as E


def convs(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


class Recorder:
    """An on_chunk callback that keeps every (index, text) it was given, in order."""

    def __init__(self):
        self.calls = []
        self.thread_ids = set()

    def __call__(self, index, text):
        self.calls.append((index, text))
        self.thread_ids.add(threading.get_ident())

    def joined(self, index):
        """What the deltas of one item say its answer is (text after its last None)."""
        texts = [t for i, t in self.calls if i == index]
        while None in texts:
            texts = texts[texts.index(None) + 1:]
        return "".join(texts)

    def count(self, index):
        return sum(1 for i, t in self.calls if i == index and t is not None)


PROMPTS = [
    "plain question",
    "unicode résumé 中文 😀 [[stream_odd]]",
    "escaped \"quotes\" \\ back\\slash\ttab 😀 é [[stream_ascii]]",
    "odd line breaks and comments [[stream_odd]]",
    "no done marker [[stream_nodone]]",
    "",
]


def test_stream_gives_the_same_outputs_and_usage_as_a_whole_answer(server, make_lm):
    lm = make_lm()
    prompts = PROMPTS + [f"row {i} " + "word " * (i % 7) for i in range(60)]
    whole = lm(convs(prompts))
    streamed = lm(convs(prompts), stream=True)
    assert whole.errors == [None] * len(prompts) and streamed.errors == whole.errors
    assert streamed.outputs == whole.outputs
    assert streamed.finish_reasons == whole.finish_reasons == ["stop"] * len(prompts)
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "requests"):
        assert getattr(streamed.usage, name) == getattr(whole.usage, name) > 0
    # the same through llm_batch, sync and async
    assert semex.llm_batch(prompts, model=lm, stream=True) == whole.outputs
    assert asyncio.run(semex.llm_batch_async(prompts, model=lm, stream=True)) == whole.outputs
    # and the answers really were streams: a body cut half-way would have been retried
    cut = lm(convs(["x [[stream_cut*1]]"]), stream=True)
    assert cut.outputs == ["echo: x"] and cut.usage.requests == 2


def test_stream_usage_follows_stream_options(server, make_lm):
    lm = make_lm()
    asked = lm(convs(["count me please"]), stream=True)
    assert asked.usage.prompt_tokens > 0 and asked.usage.completion_tokens > 0
    # the user's own stream_options win: without include_usage the server sends none
    own = lm(convs(["count me please"]), stream=True,
             stream_options={"include_usage": False})
    assert own.outputs == asked.outputs
    assert own.usage.total_tokens == 0
    # prices still give a cost for streamed calls
    priced = make_lm(input_price_per_million=1.0, output_price_per_million=2.0)
    out = priced(convs(["cost this"]), stream=True)
    assert out.usage.cost == pytest.approx(
        (out.usage.prompt_tokens + 2 * out.usage.completion_tokens) / 1e6)


def test_a_server_that_streams_without_being_asked_still_works(server, make_lm):
    lm = make_lm()
    prompts = ["a [[sse]]", "b [[sse]] [[stream_odd]]", "c"]
    out = lm(convs(prompts))
    assert out.errors == [None] * 3
    assert out.outputs == ["echo: a", "echo: b", "echo: c"]
    # via LM(extra_body=...) too
    lm2 = make_lm(extra_body={"stream": True})
    assert lm2(convs(["d"])).outputs == ["echo: d"]


def _check_deltas(recorder, outputs):
    for i, text in enumerate(outputs):
        assert recorder.joined(i) == text, i
    # one item's texts came in order: their concatenation is a prefix-preserving build-up
    assert {i for i, _ in recorder.calls} == set(range(len(outputs)))


def test_on_chunk_deltas_join_to_each_output_in_order_sync(server, make_lm):
    lm = make_lm(max_concurrency=16)
    prompts = [f"row {i} with a longer answer to stream [[stream_odd]]" for i in range(40)]
    rec = Recorder()
    out = lm(convs(prompts), on_chunk=rec)
    assert out.errors == [None] * 40
    assert out.outputs == [f"echo: row {i} with a longer answer to stream" for i in range(40)]
    _check_deltas(rec, out.outputs)
    # the text really arrived in pieces, not as one answer at the end
    assert sum(rec.count(i) > 1 for i in range(40)) >= 20
    # called on the caller's thread only
    assert rec.thread_ids == {threading.get_ident()}
    # llm_batch takes the callback too (and its alias on_token)
    rec2 = Recorder()
    got = semex.llm_batch(prompts[:5], model=lm, on_token=rec2)
    _check_deltas(rec2, got)


def _async_run(lm, prompts, runner):
    rec = Recorder()

    async def main():
        loop_thread = threading.get_ident()
        out = await lm.async_call(convs(prompts), on_chunk=rec)
        return out, loop_thread

    out, loop_thread = runner(main())
    assert rec.thread_ids == {loop_thread}
    return rec, out


def test_on_chunk_deltas_join_to_each_output_in_order_asyncio(server, make_lm):
    lm = make_lm(max_concurrency=16)
    prompts = [f"async row {i} streams its answer [[stream_odd]]" for i in range(30)]
    rec, out = _async_run(lm, prompts, asyncio.run)
    assert out.outputs == [f"echo: async row {i} streams its answer" for i in range(30)]
    _check_deltas(rec, out.outputs)
    assert sum(rec.count(i) > 1 for i in range(30)) >= 15


def test_on_chunk_deltas_join_to_each_output_in_order_uvloop(server, make_lm):
    uvloop = pytest.importorskip("uvloop")
    lm = make_lm(max_concurrency=16)
    prompts = [f"uv row {i} streams [[stream_odd]]" for i in range(30)]
    rec, out = _async_run(lm, prompts, uvloop.run)
    assert out.outputs == [f"echo: uv row {i} streams" for i in range(30)]
    _check_deltas(rec, out.outputs)


def test_on_chunk_covers_answers_that_arrive_whole(server, make_lm):
    lm = make_lm()
    rec = Recorder()
    # a body that is JSON although a stream was asked for: handed over as one delta
    body = json.dumps({"choices": [{"message": {"content": "whole"},
                                    "finish_reason": "stop"}]}).encode()
    b64 = base64.urlsafe_b64encode(body).decode()
    out = lm(convs([f"x [[rawb64={b64}]]", "y"]), on_chunk=rec)
    assert out.outputs == ["whole", "echo: y"]
    assert rec.calls.count((0, "whole")) == 1
    _check_deltas(rec, out.outputs)


def test_cut_stream_is_retried_then_succeeds(server, make_lm):
    lm = make_lm(max_retries=3)
    rec = Recorder()
    prompts = ["cut once and retried [[stream_cut*1]]",
               "closed once [[stream_close*1]]", "fine"]
    out = lm(convs(prompts), on_chunk=rec)
    assert out.errors == [None] * 3
    assert out.outputs == ["echo: cut once and retried", "echo: closed once", "echo: fine"]
    assert out.usage.retries == 2
    # the first attempt had streamed text: a None said to drop it before the retry's text
    texts = [t for i, t in rec.calls if i == 0]
    assert None in texts and texts[0] is not None
    _check_deltas(rec, out.outputs)
    outcomes = [r["outcome"] for r in server.log() if r["key"].startswith("cut once")]
    assert outcomes == ["stream_cut", 200]


def test_cut_stream_that_stays_cut_ends_as_the_rows_connection_error(server, make_lm):
    lm = make_lm(max_retries=2)
    rec = Recorder()
    out = lm(convs(["always cut [[stream_cut]]", "ok"]), on_chunk=rec)
    assert out.outputs == [None, "echo: ok"]
    err = out.errors[0]
    assert isinstance(err, E.APIConnectionError)
    assert "[DONE]" in str(err) and err.attempts == 3 and err.index == 0
    assert (0, None) in rec.calls
    assert rec.joined(0) == ""  # what it streamed was taken back


def test_error_event_is_the_rows_typed_error_and_other_rows_succeed(server, make_lm):
    lm = make_lm(max_retries=2)
    prompts = ["server trouble [[stream_error]]", "bad request [[stream_error=400]]",
               "trouble once [[stream_error*1]]", "fine"]
    out = lm(convs(prompts), stream=True)
    assert out.outputs == [None, None, "echo: trouble once", "echo: fine"]
    first, second = out.errors[0], out.errors[1]
    # no code: a server error, retried like a 5xx
    assert isinstance(first, E.ServerError) and first.attempts == 3 and first.status == 500
    assert "inside the event stream" in str(first)
    # code 400: not retried; the provider's message is in the error
    assert type(second) is E.APIStatusError and second.attempts == 1 and second.status == 400
    assert "error while streaming your answer" in str(second)
    assert out.errors[2] is None and out.errors[3] is None
    assert out.usage.failed == 2


def test_stream_content_with_escapes_and_surrogate_pairs_matches_json_loads(server, make_lm):
    lm = make_lm()
    text = "quote \" backslash \\ slash / tab \t nl \n bell \x07 é 中 😀 𝄞 \u2028 end"
    out = lm(convs([text + " [[stream_ascii]]", text + " [[stream_odd]]"]), stream=True)
    assert out.outputs == ["echo: " + text.strip()] * 2

    # streams the C reader leaves to Python (a surrogate pair split over two chunks; NaN)
    # give exactly what json.loads of each chunk gives
    chunks = ['{"choices":[{"index":0,"delta":{"content":"a\\ud83d"}}]}',
              '{"choices":[{"index":0,"delta":{"content":"\\ude00b"},"x":NaN}]}',
              '{"choices":[{"index":0,"delta":{"content":"\\u00e9"},"finish_reason":"stop"}]}',
              '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
              '"total_tokens":5}}']
    body = "".join(f"data: {c}\n\n" for c in chunks) + "data: [DONE]\n\n"
    want = "".join(json.loads(c)["choices"][0]["delta"]["content"] for c in chunks[:3])
    b64 = base64.urlsafe_b64encode(body.encode()).decode()
    for marker in ("[[sse]]", ""):  # as text/event-stream, and mislabelled as JSON
        out = lm(convs([f"raw {marker} [[rawb64={b64}]]"]))
        assert out.errors == [None]
        assert out.outputs == [want] and out.usage.total_tokens == 5
        assert out.finish_reasons == ["stop"]


def test_python_reader_reports_cut_and_error_streams_like_the_engine(server, make_lm):
    lm = make_lm(max_retries=0)
    lone = '{"choices":[{"index":0,"delta":{"content":"\\ud800"}}]}'
    cut = f"data: {lone}\n\n"
    err = f'data: {lone}\n\ndata: {{"error":{{"message":"went wrong","code":429}}}}\n\n'
    bad = f"data: {lone}\n\ndata: not json\n\ndata: [DONE]\n\n"
    prompts = [f"p [[sse]] [[rawb64={base64.urlsafe_b64encode(b.encode()).decode()}]]"
               for b in (cut, err, bad)]
    out = lm(convs(prompts))
    assert isinstance(out.errors[0], E.APIConnectionError) and "[DONE]" in str(out.errors[0])
    assert isinstance(out.errors[1], E.RateLimitError) and "went wrong" in str(out.errors[1])
    assert isinstance(out.errors[2], E.ResponseFormatError)


def test_bad_stream_options_are_rejected_before_any_request(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match="on_chunk"):
        lm(convs(["x"]), on_chunk=lambda i, t: None, stream=False)
    with pytest.raises(E.ConfigurationError, match="callable"):
        lm(convs(["x"]), on_chunk="print")
    with pytest.raises(E.ConfigurationError, match="one of on_chunk and on_token"):
        semex.llm_batch(["x"], model=lm, on_chunk=print, on_token=print)
    with pytest.raises(E.ConfigurationError, match="stream must be True or False"):
        lm(convs(["x"]), stream="yes")
    assert server.log() == []


def test_an_exception_in_on_chunk_stops_the_call(server, make_lm):
    lm = make_lm(timeout=30)

    def boom(index, text):
        raise RuntimeError("display broke")

    with pytest.raises(RuntimeError, match="display broke"):
        lm(convs(["a [[stream_stall]]", "b"]), on_chunk=boom)

    async def main():
        await lm.async_call(convs(["c [[stream_stall]]", "d"]), on_chunk=boom)

    with pytest.raises(RuntimeError, match="display broke"):
        asyncio.run(main())
    assert lm(convs(["after"]), stream=True).outputs == ["echo: after"]


def _wait_all_closed(server):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.stats()["open_connections"] > 0:
        time.sleep(0.05)


def test_ctrl_c_during_a_streamed_sync_wait_raises_promptly(server, make_lm):
    lm = make_lm(timeout=30)
    rec = Recorder()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lm(convs([f"s{i} stalls half-way [[stream_stall]]" for i in range(5)]),
               on_chunk=rec)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 3
    assert {i for i, _ in rec.calls} == set(range(5))  # their first halves were shown
    _wait_all_closed(server)
    assert all(r["outcome"] == "client_closed" for r in server.log())
    assert lm(convs(["after"]), stream=True).outputs == ["echo: after"]


def test_cancelling_a_streamed_async_call_closes_its_transfers(server, make_lm):
    lm = make_lm(timeout=30)
    rec = Recorder()

    async def main():
        task = asyncio.ensure_future(lm.async_call(
            convs([f"a{i} stalls [[stream_stall]]" for i in range(8)]), on_chunk=rec))
        deadline = time.monotonic() + 5
        while len({i for i, _ in rec.calls}) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert {i for i, _ in rec.calls} == set(range(8))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(r["outcome"] == "client_closed" for r in server.log()):
            break
        time.sleep(0.05)
    assert [r["outcome"] for r in server.log()] == ["client_closed"] * 8
