"""sem_extract / sem_extract_async over real HTTP (the fake server's extraction mode) and
with user models (the synchronous fallback)."""
import asyncio
import enum
import random
import threading
import time
from typing import List, Optional

import pytest
from pydantic import BaseModel, Field

import semex
from semex import errors as E

FIELDS = {"sentiment": "positive/negative/neutral", "product": None}


def docs_of(texts):
    return [{"text": t} for t in texts]


def expected_row(doc_id, quotes=False):
    row = {"sentiment": f"sentiment:{doc_id}", "product": f"product:{doc_id}"}
    if quotes:
        row.update({"sentiment_quote": doc_id, "product_quote": doc_id})
    return row


def test_rows_keep_input_order_across_thousands_of_docs(server, make_lm):
    server.configure(latency_ms=[0, 20])
    lm = make_lm(max_concurrency=200)
    texts = [f"ticket {i}" for i in range(3000)]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=10, progress=False)
    assert out.errors == [None] * 3000
    assert out.outputs == [expected_row(t) for t in texts]
    log = server.log()
    assert len(log) == 300 and all(r["ndocs"] == 10 for r in log)
    assert out.usage.requests == 300 and out.usage.prompt_tokens > 0


@pytest.mark.parametrize("structured", [True, "json_object", False])
def test_every_structured_output_mode_gives_the_same_rows(server, make_lm, structured):
    lm = make_lm(structured_output=structured)
    texts = [f"doc {i}" for i in range(25)]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=4, progress=False)
    assert out.outputs == [expected_row(t) for t in texts]


@pytest.mark.parametrize("directive", ["batch_short", "batch_long", "batch_badjson",
                                       "batch_bad_ids", "overflow"])
def test_bad_batch_answers_are_split_down_to_correct_rows(server, make_lm, directive):
    lm = make_lm()
    texts = [f"d{i}" for i in range(8)]
    texts[5] += f" [[{directive}]]"
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=8, progress=False)
    assert out.errors == [None] * 8
    assert out.outputs == [expected_row(f"d{i}") for i in range(8)]
    sizes = [r["ndocs"] for r in server.log()]
    assert sizes[0] == 8 and 1 in sizes  # the bad batch was halved down to the culprit
    assert len(sizes) <= 1 + 2 + 2 + 2  # halving, not one request per document


def test_reordered_batch_answers_are_put_back_by_id(server, make_lm):
    lm = make_lm()
    texts = [f"r{i}" for i in range(6)]
    texts[0] += " [[batch_reorder]]"
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=6, progress=False)
    assert out.outputs == [expected_row(f"r{i}") for i in range(6)]
    assert len(server.log()) == 1


def test_fenced_and_chatty_answers_are_parsed(server, make_lm):
    lm = make_lm(structured_output=False)
    texts = ["f1 [[batch_fence]]", "f2"]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=2, progress=False)
    assert out.outputs == [expected_row("f1"), expected_row("f2")]
    out = semex.sem_extract(docs_of(["p1 [[prose]]", "p2 [[fence]]"]), lm, FIELDS,
                            use_batch_processing=False, progress=False)
    assert out.outputs == [expected_row("p1"), expected_row("p2")]


def test_identical_documents_are_sent_once(server, make_lm):
    lm = make_lm()
    texts = ["same"] * 50 + ["other"] * 30 + ["third"]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=10, progress=False)
    assert out.outputs == [expected_row(t) for t in texts]
    sent = [d for r in server.log() for d in r["doc_ids"]]
    assert sorted(sent) == ["other", "same", "third"]
    assert out.usage.cache_hits == 78


def test_extract_quotes_adds_the_supporting_spans(server, make_lm):
    out = semex.sem_extract(docs_of(["q one", "q two"]), make_lm(), FIELDS,
                            extract_quotes=True, progress=False)
    assert out.outputs == [expected_row("q one", True), expected_row("q two", True)]


class Mood(enum.Enum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"


class Ticket(BaseModel):
    mood: Mood = Field(description="how the customer feels")
    words: int
    score: float
    urgent: bool
    tags: List[str]
    note: Optional[str] = None


def typed_row(doc_id):
    n = len(doc_id)
    return {"mood": list(Mood)[n % 3].value, "words": n, "score": n / 2, "urgent": n % 2 == 0,
            "tags": doc_id.split(), "note": f"note:{doc_id}"}


@pytest.mark.parametrize("batch_size", [1, 5])
def test_pydantic_output_cols_give_typed_validated_values(server, make_lm, batch_size):
    texts = [f"typed doc {i} {'x' * i}".strip() for i in range(7)]
    out = semex.sem_extract(docs_of(texts), make_lm(), Ticket, batch_size=batch_size,
                            progress=False)
    assert out.errors == [None] * 7
    assert out.outputs == [typed_row(t) for t in texts]
    assert isinstance(out.outputs[0]["words"], int) and isinstance(out.outputs[0]["urgent"], bool)


def test_a_row_failing_validation_is_retried_once_with_the_error(server, make_lm):
    texts = ["good one", "flaky one [[invalid_once]]", "broken one [[invalid_always]]"]
    out = semex.sem_extract(docs_of(texts), make_lm(), Ticket, batch_size=3, progress=False)
    assert out.outputs[0] == typed_row("good one")
    assert out.outputs[1] == typed_row("flaky one")
    assert isinstance(out.errors[2], E.ResponseFormatError)
    assert "row 2" in str(out.errors[2]) and out.outputs[2]["words"] is None
    retried = [r for r in server.log() if r["ndocs"] == 1]
    # each invalid row is sent once more, alone, with the validation error; then given up
    assert sorted(d for r in retried for d in r["doc_ids"]) == ["broken one", "flaky one"]


def test_failed_requests_become_typed_row_errors_and_keep_the_rest(server, make_lm):
    lm = make_lm(max_retries=1)
    texts = ["fine a", "fine b", "doomed [[fail=500]]", "fine c"]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, use_batch_processing=False,
                            progress=False)
    assert [out.outputs[i] for i in (0, 1, 3)] == [expected_row(t) for t in
                                                    ("fine a", "fine b", "fine c")]
    assert isinstance(out.errors[2], E.ServerError) and str(out.errors[2]).startswith("row 2:")
    assert out.outputs[2] == {"sentiment": None, "product": None}
    with pytest.raises(E.BatchError) as info:
        semex.sem_extract(docs_of(texts), lm, FIELDS, use_batch_processing=False,
                          progress=False, on_error="raise")
    assert info.value.results.outputs[0] == expected_row("fine a")


def test_async_twin_on_a_running_loop(server, make_lm):
    lm = make_lm()
    texts = [f"a{i}" for i in range(40)]

    async def main():
        return await semex.sem_extract_async(docs_of(texts), lm, FIELDS, batch_size=5,
                                             max_concurrent_batches=2, progress=False)

    out = asyncio.run(main())
    assert out.outputs == [expected_row(t) for t in texts]


def test_bad_arguments_are_rejected_before_any_request(server, make_lm):
    lm = make_lm()
    with pytest.raises(E.ConfigurationError, match="output_cols must map names"):
        semex.sem_extract(docs_of(["x"]), lm, ["sentiment"])
    with pytest.raises(E.ConfigurationError, match="empty"):
        semex.sem_extract(docs_of(["x"]), lm, {})
    with pytest.raises(E.ConfigurationError, match=r"docs\[1\]"):
        semex.sem_extract([{"text": "x"}, "y"], lm, FIELDS)
    with pytest.raises(E.ConfigurationError, match="batch_size"):
        semex.sem_extract(docs_of(["x"]), lm, FIELDS, batch_size=0)
    with pytest.raises(E.ConfigurationError, match="prompt_strategy"):
        semex.sem_extract(docs_of(["x"]), lm, FIELDS, prompt_strategy=object())
    assert server.log() == []


def test_empty_documents_are_not_sent(server, make_lm):
    out = semex.sem_extract([{"text": "real"}, {"text": None}, {"text": "  "}], make_lm(),
                            FIELDS, progress=False)
    assert out.outputs[0] == expected_row("real")
    assert isinstance(out.errors[1], semex.extract.EmptyDocumentError)
    assert isinstance(out.errors[2], semex.extract.EmptyDocumentError)
    assert [d for r in server.log() for d in r["doc_ids"]] == ["real"]


def test_safe_mode_reports_before_sending(server, make_lm, capsys):
    semex.sem_extract(docs_of(["s1", "s2"]), make_lm(), FIELDS, safe_mode=True,
                      progress=False)
    err = capsys.readouterr().err
    assert "2 documents" in err and "calls" in err


# -- user models: async_call, and the synchronous fallback --------------------------------

class RecordingModel:
    """A local model without an async path: records the thread and loop of each call."""

    def __init__(self, delay=0.0):
        self.calls = []
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, messages_batch):
        import json
        import time
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append((threading.current_thread().name, loop, len(messages_batch)))
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        answers = []
        for messages in messages_batch:
            doc = messages[-1]["content"].split("\n", 1)[1]
            doc_id = doc.split(": ", 1)[1].split("\n")[0]
            answers.append(json.dumps({"sentiment": f"sentiment:{doc_id}",
                                       "product": f"product:{doc_id}"}))
        return answers


def test_plain_callable_is_called_directly_by_the_sync_api():
    model = RecordingModel()
    out = semex.sem_extract(docs_of(["m1", "m2", "m3"]), model, FIELDS,
                            use_batch_processing=False, progress=False)
    assert out.outputs == [expected_row(t) for t in ("m1", "m2", "m3")]
    assert model.calls == [(threading.current_thread().name, None, 3)]


def test_plain_callable_runs_in_worker_threads_under_the_async_api():
    model = RecordingModel(delay=0.05)
    texts = [f"t{i}" for i in range(12)]
    ticks = []

    async def main():
        loop = asyncio.get_running_loop()
        ticker = asyncio.ensure_future(_tick(ticks))
        out = await semex.sem_extract_async(docs_of(texts), model, FIELDS,
                                            use_batch_processing=False,
                                            max_concurrent_batches=3, progress=False)
        ticker.cancel()
        return loop, out

    loop, out = asyncio.run(main())
    assert out.outputs == [expected_row(t) for t in texts]
    main_thread = threading.main_thread().name
    assert all(name != main_thread and call_loop is None for name, call_loop, _ in model.calls)
    assert len(model.calls) == 12 and model.peak <= 3 and model.peak >= 2
    assert len(ticks) >= 5  # the loop kept running while the model worked


async def _tick(ticks):
    while True:
        ticks.append(1)
        await asyncio.sleep(0.01)


def test_object_with_async_call_is_awaited():
    class AsyncModel:
        def __init__(self):
            self.inner = RecordingModel()

        async def async_call(self, messages_batch):
            await asyncio.sleep(0)
            return self.inner(messages_batch)

    model = AsyncModel()
    out = asyncio.run(semex.sem_extract_async(docs_of(["x1", "x2"]), model, FIELDS,
                                              use_batch_processing=False, progress=False))
    assert out.outputs == [expected_row("x1"), expected_row("x2")]
    assert model.inner.calls[0][1] is not None  # ran on the loop, not in a thread


def test_a_user_model_that_raises_fails_only_its_rows():
    def flaky(messages_batch):
        if "bad" in messages_batch[0][-1]["content"]:
            raise RuntimeError("GPU on fire")
        return RecordingModel()(messages_batch)

    out = asyncio.run(semex.sem_extract_async(docs_of(["ok1", "bad", "ok2"]), flaky, FIELDS,
                                              use_batch_processing=False, progress=False))
    assert out.outputs[0] == expected_row("ok1") and out.outputs[2] == expected_row("ok2")
    assert "GPU on fire" in str(out.errors[1])


def test_progress_bar_and_usage_summary(server, make_lm, capsys):
    lm = make_lm(input_price_per_million=1.0, output_price_per_million=2.0)
    texts = [f"bar {i}" for i in range(20)] + ["bar 0"]
    out = semex.sem_extract(docs_of(texts), lm, FIELDS, batch_size=5,
                            progress_bar_desc="Extracting tickets")
    err = capsys.readouterr().err
    assert "Extracting tickets" in err and "21/21" in err
    assert out.usage.cache_hits == 1 and out.usage.requests == 4
    assert out.usage.cost == pytest.approx(
        (out.usage.prompt_tokens * 1.0 + out.usage.completion_tokens * 2.0) / 1e6)
    lm.print_total_usage()
    printed = capsys.readouterr().out
    assert "test-model" in printed and "4 requests" in printed and "cost" in printed


# -- streaming: chunks (lowered so that small inputs cross several) ------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    def set_rows(rows):
        monkeypatch.setattr(semex.extract, "_CHUNK_ROWS", rows)
    set_rows(7)
    return set_rows


def test_duplicates_across_chunks_are_sent_once_and_rows_stay_in_order(server, make_lm,
                                                                       small_chunks, capsys):
    texts = [f"c{i % 13}" if i % 3 else f"u{i}" for i in range(60)]  # repeats span chunks
    out = semex.sem_extract(docs_of(texts), make_lm(), FIELDS, batch_size=3,
                            progress_bar_desc="chunked")
    assert out.errors == [None] * 60
    assert out.outputs == [expected_row(t) for t in texts]
    assert out.raw_outputs[1] == out.raw_outputs[40] and '"c1"' not in out.raw_outputs[1]
    sent = [d for r in server.log() for d in r["doc_ids"]]
    assert sorted(sent) == sorted(set(texts))
    assert out.usage.cache_hits == 60 - len(set(texts))
    assert "chunked" in capsys.readouterr().err


def test_bad_batch_answers_in_a_middle_chunk_are_split_and_retried(server, make_lm,
                                                                   small_chunks):
    small_chunks(8)
    texts = [f"m{i}" for i in range(24)]
    texts[10] += " [[batch_badjson]]"
    texts[13] += " [[batch_short]]"
    out = semex.sem_extract(docs_of(texts), make_lm(), FIELDS, batch_size=4, progress=False)
    assert out.errors == [None] * 24
    assert out.outputs == [expected_row(f"m{i}") for i in range(24)]
    sizes = [r["ndocs"] for r in server.log()]
    assert sizes.count(4) >= 6 and 1 in sizes  # two bad batches halved down to the culprits


def test_validation_retries_cross_chunk_boundaries(server, make_lm, small_chunks):
    small_chunks(3)
    texts = [f"typed {i}" for i in range(9)]
    texts[2] += " [[invalid_once]]"   # last row of the first chunk
    texts[4] += " [[invalid_always]]"
    out = semex.sem_extract(docs_of(texts), make_lm(), Ticket, batch_size=2, progress=False)
    clean = [t.split(" [[")[0] for t in texts]
    assert [out.outputs[i] for i in range(9) if i != 4] == \
        [typed_row(clean[i]) for i in range(9) if i != 4]
    assert isinstance(out.errors[4], E.ResponseFormatError) and "row 4" in str(out.errors[4])
    assert [e is None for e in out.errors].count(False) == 1


def test_a_failure_in_a_middle_chunk_raises_with_every_row_of_every_chunk(server, make_lm,
                                                                          small_chunks):
    small_chunks(4)
    texts = [f"r{i}" for i in range(14)]
    texts[5] = texts[12] = "doomed [[fail=500]]"  # the later copy is a duplicate: not resent
    with pytest.raises(E.BatchError) as info:
        semex.sem_extract(docs_of(texts), make_lm(max_retries=0), FIELDS,
                          use_batch_processing=False, progress=False, on_error="raise")
    result = info.value.results
    assert len(result.outputs) == 14 and result.failed == 2
    assert [result.outputs[i] for i in range(14) if i not in (5, 12)] == \
        [expected_row(f"r{i}") for i in range(14) if i not in (5, 12)]
    assert result.outputs[12] == {"sentiment": None, "product": None}
    for i in (5, 12):
        assert isinstance(result.errors[i], E.ServerError) and result.errors[i].index == i
        assert str(result.errors[i]).startswith(f"row {i}: ")
        assert not str(result.errors[i]).startswith(f"row {i}: row ")
    assert info.value.errors is result.errors
    assert sum(d == "doomed" for r in server.log() for d in r["doc_ids"]) == 1


@pytest.mark.parametrize("lm_cap, call_cap", [(2, None), (64, 2)])
def test_async_chunks_give_the_same_rows_and_never_exceed_the_cap(server, make_lm,
                                                                  small_chunks, lm_cap,
                                                                  call_cap):
    # (2, None): steps overlap (the engine's window of 2 bounds both); (64, 2): a per-call
    # cap, so one step at a time
    server.configure(latency_ms=[0, 15])
    small_chunks(16)  # 8 prompts a step: the next step starts at the previous one's tail
    texts = [f"a{i % 57}" for i in range(120)]
    texts[40] += " [[batch_bad_ids]]"

    async def main():
        return await semex.sem_extract_async(docs_of(texts), make_lm(max_concurrency=lm_cap),
                                             FIELDS, batch_size=2,
                                             max_concurrent_batches=call_cap, progress=False)

    out = asyncio.run(main())
    assert out.errors == [None] * 120
    assert out.outputs == [expected_row(t.split(" [[")[0]) for t in texts]
    assert out.usage.cache_hits == 120 - len(set(texts))
    sent = [d for r in server.log() for d in r["doc_ids"]]
    # every distinct text once, plus the bad batch of 2 resent as 1 + 1
    assert len(sent) == len(set(texts)) + 2
    assert 1 <= server.stats()["max_in_flight"] <= 2


def test_hash_collisions_never_mix_up_documents(server, make_lm, small_chunks, monkeypatch):
    monkeypatch.setattr(semex.extract, "_text_hash", lambda text: len(text) % 3)
    monkeypatch.setattr(semex.extract, "_RECENT_MAX", 2)
    texts = [f"k{i % 11}" * (1 + i % 2) for i in range(40)]
    out = semex.sem_extract(docs_of(texts), make_lm(), FIELDS, batch_size=3, progress=False)
    assert out.errors == [None] * 40
    assert out.outputs == [expected_row(t) for t in texts]
    sent = [d for r in server.log() for d in r["doc_ids"]]
    assert set(sent) == set(texts)


class _Stop(BaseException):
    """Not an Exception, so nothing turns it into a row error: it ends the run."""


def test_an_async_step_that_raises_cancels_the_step_in_flight(server, make_lm, small_chunks,
                                                              monkeypatch):
    small_chunks(2)
    absorb = semex.extract._Extraction.absorb
    runner_calls = []
    acall = semex._models.ModelRunner.acall

    absorb_bulk = semex.extract._Extraction.absorb_bulk

    def failing_absorb(self, task, content, error, *args):
        if task.docs[0].text.endswith("boom"):
            raise _Stop()
        return absorb(self, task, content, error, *args)

    def failing_absorb_bulk(self, bulk, *args):  # one document per prompt: rows in bulk
        if any(text.endswith("boom") for text in bulk.texts):
            raise _Stop()
        return absorb_bulk(self, bulk, *args)

    async def counting_acall(self, conversations, response_format, progress):
        runner_calls.append(len(conversations))
        return await acall(self, conversations, response_format, progress)

    monkeypatch.setattr(semex.extract._Extraction, "absorb", failing_absorb)
    monkeypatch.setattr(semex.extract._Extraction, "absorb_bulk", failing_absorb_bulk)
    monkeypatch.setattr(semex._models.ModelRunner, "acall", counting_acall)
    texts = ["boom", "x", "slow [[lat=8000]]", "slower [[lat=8000]]", "z"]

    async def main():
        return await semex.sem_extract_async(docs_of(texts), make_lm(), FIELDS, batch_size=1,
                                             max_concurrent_batches=None, progress=False)

    started = time.monotonic()
    with pytest.raises(_Stop):
        asyncio.run(main())
    assert time.monotonic() - started < 5  # the slow second chunk was not waited for
    assert runner_calls == [2, 2]  # it was in flight beside the first


def test_the_dedup_index_finds_every_earlier_document():
    seen = semex.extract._Seen(10 ** 6)
    rng = random.Random(7)
    known, order, row, phases = {}, [], 0, []
    for _ in range(50):
        new = list({rng.getrandbits(64) - 2 ** 63 for _ in range(rng.randint(1, 10000))})
        probe = new + rng.sample(order, min(len(order), 300))
        assert seen.lookup(probe) == [known.get(h, -1) for h in probe]
        phases.append("dict" if seen.small is not None else "runs")
        rows = list(range(row, row + len(new)))
        row += len(new)
        seen.add(new, rows)
        known.update(zip(new, rows))
        order += new
    # a dict up to SMALL distinct documents, numpy runs after: both looked up above
    assert phases[0] == "dict" and phases[-1] == "runs" and seen.SMALL < len(known)
    assert len(seen.runs) <= 12
    big = max(seen.runs, key=lambda run: len(run[0]))
    assert big[0].nbytes >= 1 << 20 and isinstance(big[0].base, memoryview)  # own mapping
