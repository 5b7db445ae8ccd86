"""sem_extract's per-row work in C (csrc/module_rows.c, csrc/rowjson.c): answers read into
columns, documents rendered, request bodies written. Each C helper is checked against the
Python code it stands in for, on inputs mangled at random; and whole extractions with the
reader on and off must give the same rows, errors and raw answers."""
import json
import math
import random

import pandas as pd
import pytest

import semex
from semex import _engine
from semex._schema import OutputSpec, parse_json_answer, RowInvalid
from semex.extract import render_pairs, single_answer

SEEDS = [
    '{"topic": "gas", "sender": "bob", "n": 3, "topic_quote": "q", "sender_quote": null}',
    ' {"topic":"  gas\\n ", "sender": "", "n": 1.5e3}\n', '{"n": -0, "topic": true}',
    '{"topic": "\\u00e9\\ud83d\\ude00 x", "sender": "a\\"b\\\\c\\/d\\b\\f\\n\\r\\t"}', '{}',
    '{"topic": [1]}', '```json\n{"topic": "a"}\n```', '{"topic": "a", "topic": "b"}',
    '{"topic": "\\u2003x\\u00a0"}', '{"n": 123456789012345678901234567890}', '{"n": 1e400}',
    '{"n": -12.5E-3}', '{"n": NaN}', '{"topic": "a",}', '{"topic": "a"} x',
    '{"\\u0074opic": "z"}', '{"topic": "a\\ud800"}', '{"topic":"é€😀"}',
    '{"results": [{"topic": "r"}]}', '[{"topic": "l"}]', 'prose {"topic": "p"} more',
    '{"n_quote": 5, "topic": "x"}', '{"reasoning": "because", "topic": "t"}',
    '{"topic": "\x01raw control"}', '{"topic": "x"}\x0b', '\ufeff{"topic": "bom"}',
]


def python_row(spec, text):
    """What sem_extract's Python path makes of one answer at one document per prompt
    (extract._Extraction.absorb), or None when that row would not validate."""
    try:
        return spec.validate(single_answer(parse_json_answer(text), spec))
    except (ValueError, RowInvalid):
        return None


def mangled(rng, seeds, count, alphabet):
    texts = list(seeds)
    for _ in range(count):
        text = rng.choice(seeds)
        at = rng.randrange(len(text) + 1)
        op = rng.random()
        if op < 0.3:
            text = text[:at] + text[at + 1:]
        elif op < 0.6:
            text = text[:at] + rng.choice(alphabet) + text[at:]
        elif op < 0.8:
            text = text[:at] + rng.choice(seeds) + text[at:]
        else:
            text = text[:at] + text[at:][::-1]
        texts.append(text)
    return texts


@pytest.mark.parametrize("quotes,reasoning", [(False, False), (True, False), (True, True)])
def test_read_rows_matches_the_python_reader(quotes, reasoning):
    spec = OutputSpec({"topic": None, "sender": "who", "n": None}, quotes,
                      reasoning=reasoning)
    rng = random.Random(7 + quotes + 2 * reasoning)
    texts = mangled(rng, SEEDS, 30000, '{}[]":,. \\n\\u0aeé\x01\t0-+') + [None, 5]
    assert reader_agrees(spec, texts) > 3000  # the fast path is taken for the plain answers


def reader_agrees(spec, texts):
    """Check every row read_rows reads against python_row; returns how many it read."""
    names, kinds = spec.row_reader()
    flags, columns = _engine.read_rows(texts, names, kinds)
    assert len(flags) == len(texts) and all(len(c) == len(texts) for c in columns)
    read = 0
    for i, text in enumerate(texts):
        if not flags[i]:
            assert all(c[i] is None for c in columns)
            continue
        read += 1
        row = {name: columns[k][i] for k, name in enumerate(names)}
        expected = python_row(spec, text)
        assert expected is not None, text
        assert row == expected, text
        for name in names:  # the same types too (1 is not 1.0, True is not 1)
            assert type(row[name]) is type(expected[name]), (text, name)
            if isinstance(row[name], float) and math.copysign(1, row[name]) < 0:
                assert math.copysign(1, expected[name]) < 0
    return read


def test_read_rows_refuses_what_it_cannot_read_exactly():
    spec = OutputSpec({"topic": None}, False)
    names, kinds = spec.row_reader()
    texts = ['{"topic": [1]}', '{"topic": NaN}', '```{"topic": "a"}```', '{"\\u0074opic": 1}',
             '{"topic": "a\\ud800"}', '{"topic": "\x01"}', '{"results": [{"topic": 1}]}',
             "\ud800", None, '{"topic": 1' + "0" * 700 + "}"]
    flags, _ = _engine.read_rows(texts, names, kinds)
    assert list(flags) == [0] * len(texts)
    flags, columns = _engine.read_rows(['{"topic": " a "}', '{"other": {"x": 1}}'], names,
                                       kinds)
    assert list(flags) == [1, 0] and columns[0][0] == "a"
    with pytest.raises(ValueError):
        _engine.read_rows(["{}"], names, b"")
    with pytest.raises(TypeError):
        _engine.read_rows(("{}",), names, kinds)


TYPED_SEEDS = [
    '{"name": "x", "count": 3, "score": 1.5, "urgent": true, "note": null, "level": 2}',
    '{"name": " padded ", "count": -4, "score": 7, "urgent": false, "note": "n", '
    '"level": null}', '{"name": "x", "count": "3", "score": 1, "urgent": true, "level": 1}',
    '{"name": 5, "count": 1.0, "score": -2, "urgent": 1, "note": 3, "level": true}',
    '{"name": null, "count": 10000000000000000000000, "score": 1e400, "urgent": "yes"}',
    '{"count": 3, "score": 0.5, "urgent": true, "note": "", "level": 0}',
    '{"name": "é", "count": 0, "score": -0.0, "urgent": false, "note": "q", "level": -1}',
]


def typed_model():
    pydantic = pytest.importorskip("pydantic")
    from typing import Optional

    class Row(pydantic.BaseModel):
        name: str
        count: int
        score: float
        urgent: bool
        note: Optional[str] = None
        level: Optional[int]

    return Row


def test_read_rows_matches_pydantic_for_plain_typed_fields():
    spec = OutputSpec(typed_model(), True)
    assert spec.row_reader() is not None
    rng = random.Random(17)
    texts = mangled(rng, TYPED_SEEDS, 30000, '{}[]":,. \ntrufalse0123.e-')
    assert reader_agrees(spec, texts) > 1000


def test_typed_fields_the_reader_cannot_reproduce_go_to_pydantic():
    pydantic = pytest.importorskip("pydantic")
    from typing import List

    class Listed(pydantic.BaseModel):
        tags: List[str]

    class Bounded(pydantic.BaseModel):
        n: int = pydantic.Field(ge=0)

    class Checked(pydantic.BaseModel):
        n: int

        @pydantic.field_validator("n")
        @classmethod
        def positive(cls, v):
            return abs(v)

    class Strict(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(str_strip_whitespace=True)
        s: str

    class Aliased(pydantic.BaseModel):
        s: str = pydantic.Field(alias="S")

    for model in (Listed, Bounded, Checked, Strict, Aliased):
        assert OutputSpec(model, False).row_reader() is None, model
    assert OutputSpec(typed_model(), False).row_reader()[1] == bytes(
        [2, 3, 4, 5, 2 | 0x80, 3 | 0x80])


def test_render_docs_matches_render_pairs():
    rng = random.Random(3)
    pool = ["plain", "", "  ", "\u2003", " x ", "é€😀", "line\nbreak", None, float("nan"),
            "\x00nul", "[bracket]: text", "\t"]
    odd = [5, 2.5, True, ["a", 1], {"k": "v"}, pd.NA, pd.Timestamp("2024-01-02")]
    keys = ("text", "subject", 7)
    labels = tuple(f"{k}" for k in keys)
    columns = tuple([rng.choice(pool + (odd if rng.random() < 0.1 else []))
                     for _ in range(5000)] for _ in keys)
    texts = _engine.render_docs(labels, columns)
    handled = 0
    for i, text in enumerate(texts):
        values = [c[i] for c in columns]
        if text is None:  # left to Python: a value that is not text, None or NaN
            assert any(not (v is None or isinstance(v, str) or
                            (type(v) is float and v != v)) for v in values)
            continue
        handled += 1
        assert text == render_pairs(zip(keys, values))
    assert handled > 4000
    assert _engine.render_docs(("a",), (["x"],)) == ["[a]: x"]
    with pytest.raises(TypeError):
        _engine.render_docs(("a", "b"), (["x"], ["y", "z"]))
    with pytest.raises(ValueError):
        _engine.render_docs(("a", "b"), (["x"],))


def test_render_dicts_matches_render_document():
    from semex.extract import render_document

    rng = random.Random(4)
    pool = ["plain", "", "  ", " x ", "é€😀", "two\nlines", None, float("nan"), "\t"]
    odd = [5, ["a"], {"k": 1}, pd.NA]
    keys = ["text", "subject", "body", 3]
    docs = []
    for _ in range(4000):
        doc = {k: rng.choice(pool + (odd if rng.random() < 0.1 else []))
               for k in rng.sample(keys[:3] + ([keys[3]] if rng.random() < 0.05 else []),
                                   rng.randint(0, 3))}
        docs.append(doc)
    docs += [{}, pd.Series({"text": "a series"})]
    texts = _engine.render_dicts(docs)
    handled = 0
    for doc, text in zip(docs, texts):
        if text is None:
            assert type(doc) is not dict or any(
                not isinstance(k, str) or not (v is None or isinstance(v, str) or
                                               (type(v) is float and v != v))
                for k, v in doc.items())
            continue
        handled += 1
        assert text == render_document(doc)
    assert handled > 3000


def test_row_dicts():
    flags = bytearray([1, 0, 1])
    rows = _engine.row_dicts(("a", "b"), ([1, None, "x"], [2.5, None, None]), flags)
    assert rows == [{"a": 1, "b": 2.5}, None, {"a": "x", "b": None}]
    assert list(rows[0]) == ["a", "b"]
    with pytest.raises(ValueError):
        _engine.row_dicts(("a",), ([1, 2],), flags)


def test_chat_bodies_match_json_dumps():
    rng = random.Random(5)
    chars = [chr(c) for c in range(0, 0x30)] + ['"', "\\", "é", "€", "😀", "\u2028", "\x7f"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randrange(0, 40)))
             for _ in range(3000)]
    head, tail = '{"model": "m", "messages": [{"role": "user", "content": '.encode(), b"}]}"
    bodies = _engine.chat_bodies(head, texts, tail)
    for text, body in zip(texts, bodies):
        assert body == head + json.dumps(text, ensure_ascii=False).encode() + tail
    assert _engine.chat_bodies(b"", ["\ud800", 5, "ok"], b"") == [None, None, b'"ok"']


def run_extract(monkeypatch, reader_on, fn):
    if not reader_on:
        monkeypatch.setattr(OutputSpec, "row_reader", lambda self: None)
    try:
        return fn()
    finally:
        monkeypatch.undo()


def comparable(out):
    return (out.outputs, out.raw_outputs, [None if e is None else (type(e), str(e))
                                           for e in out.errors], out.explanations)


@pytest.mark.parametrize("api,typed", [("sync", False), ("async", False), ("frame", False),
                                       ("sync", True), ("frame", True)])
def test_extractions_with_and_without_the_c_reader_agree(server, make_lm, monkeypatch, api,
                                                         typed):
    """Duplicates within and across chunks (also while their first copy is in flight),
    empty documents, answers only Python reads (fenced, prose, null), answers that fail
    validation once or always, refused documents and failed requests."""
    import asyncio

    monkeypatch.setattr(semex.extract, "_CHUNK_ROWS", 9)
    specials = ["[[fence]]", "[[prose]]", "[[null]]", "[[invalid_once]]",
                "[[invalid_always]]", "[[refuse]]", "[[fail=500]]", "[[lat=300]]"]
    rng = random.Random(11)
    texts = []
    for i in range(120):
        r = rng.random()
        if r < 0.15 and texts:  # a repeat, of a row near (maybe still in flight) or far
            texts.append(rng.choice(texts[-12:] if rng.random() < 0.6 else texts))
        elif r < 0.2:
            texts.append(rng.choice(["", "   ", None]))
        elif r < 0.35:
            texts.append(f"doc {i} {rng.choice(specials)}")
        else:
            texts.append(f"doc {i}")
    docs = [{"text": t} for t in texts]
    fields = {"sentiment": "positive/negative/neutral", "product": None}
    if typed:
        fields = typed_model()
        assert OutputSpec(fields, True).row_reader() is not None

    def call():
        lm = make_lm(max_retries=0, max_concurrency=16)
        if api == "sync":
            return comparable(semex.sem_extract(docs, lm, fields, batch_size=1,
                                                extract_quotes=True, progress=False))
        if api == "async":
            return comparable(asyncio.run(semex.sem_extract_async(
                docs, lm, fields, batch_size=1, extract_quotes=True,
                max_concurrent_batches=None, progress=False)))
        frame = pd.DataFrame({"text": texts}).sem_extract(
            ["text"], fields, model=lm, batch_size=1, extract_quotes=True,
            return_raw_outputs=True, progress=False)
        return frame.astype(object).where(frame.notna(), None).to_dict("list")

    import warnings
    read = []
    real = _engine.read_rows

    def counting(contents, names, kinds):
        flags, columns = real(contents, names, kinds)
        read.append(flags.count(1))
        return flags, columns

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(_engine, "read_rows", counting)
        with_reader = run_extract(monkeypatch, True, call)
        assert sum(read) > 40  # the plain answers were read in C
        monkeypatch.setattr(semex.extract, "_CHUNK_ROWS", 9)
        without = run_extract(monkeypatch, False, call)
    assert with_reader == without


def test_ctrl_c_cancels_both_steps_of_a_sync_extraction(server, make_lm, monkeypatch):
    """The synchronous driver keeps two steps in flight (extract._drive_overlapped): Ctrl-C
    during the wait raises promptly, every request of both steps is cancelled, and the LM
    still works after."""
    import os
    import signal
    import threading
    import time

    monkeypatch.setattr(semex.extract, "_CHUNK_ROWS", 4)
    lm = make_lm(timeout=30, max_concurrency=16)
    started_steps = []
    real_start = semex._models.ModelRunner.start

    def start(self, *args):
        started_steps.append(1)
        return real_start(self, *args)

    monkeypatch.setattr(semex._models.ModelRunner, "start", start)
    texts = [f"d{i} [[stall]]" for i in range(8)]
    timer = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT))
    began = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            semex.sem_extract([{"text": t} for t in texts], lm, {"a": None}, batch_size=1,
                              progress=False)
    finally:
        timer.cancel()
    assert time.monotonic() - began < 3
    assert len(started_steps) == 2  # the second chunk was sent beside the first
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.stats()["open_connections"] > 0:
        time.sleep(0.05)
    outcomes = [r["outcome"] for r in server.log()]
    assert len(outcomes) == 8 and set(outcomes) == {"client_closed"}
    out = semex.sem_extract([{"text": "after"}], lm, {"a": None}, batch_size=1,
                            progress=False)
    assert out.errors == [None]


def test_user_models_take_the_bulk_path_too(monkeypatch):
    """A plain callable model (the synchronous fallback) and an async_call model at one
    document per prompt: their answers go through the C reader as well, with the same rows
    and errors as the Python reader gives, a wrong number of outputs failing every row of
    that call."""
    import asyncio

    def answer(conversation):
        doc = conversation[-1]["content"].split("]: ", 1)[-1]
        if "fence" in doc:
            return f'```json\n{{"a": "{doc}"}}\n```'
        if "bad" in doc:
            return "no json here"
        return json.dumps({"a": f" {doc} ", "b": len(doc)})

    def model(batch):
        return [answer(c) for c in batch]

    class AsyncModel:
        async def async_call(self, batch):
            return [answer(c) for c in batch]

    texts = ["x1", "fence 2", "bad 3", "x1", "", "x5"] * 3
    docs = [{"text": t} for t in texts]
    fields = {"a": None, "b": None}

    def run(fn):
        return comparable(fn())

    for call in (lambda: semex.sem_extract(docs, model, fields, batch_size=1, progress=False),
                 lambda: asyncio.run(semex.sem_extract_async(
                     docs, AsyncModel(), fields, batch_size=1, progress=False))):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = run(call)
            monkeypatch.setattr(OutputSpec, "row_reader", lambda self: None)
            slow = run(call)
            monkeypatch.undo()
        assert fast == slow
        outputs = fast[0]
        assert outputs[0] == {"a": "x1", "b": 2} and outputs[1] == {"a": "fence 2", "b": None}
        assert fast[2][2] is not None and fast[2][4] is not None  # bad answer, empty doc

    def short(batch):
        return ['{"a": 1}'] * (len(batch) - 1)

    with pytest.warns(Warning, match="3 of 3 rows failed"):
        out = semex.sem_extract(docs[:3], short, fields, batch_size=1, progress=False)
    assert all(e is not None for e in out.errors)
