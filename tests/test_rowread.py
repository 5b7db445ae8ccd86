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
from semex.extract import render_pairs

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
        value = parse_json_answer(text)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("results"), list) and \
            len(value["results"]) == 1 and not set(value) & set(spec.columns):
        value = value["results"][0]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        return spec.validate(value)
    except RowInvalid:
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
    names, kinds = spec.row_reader()
    rng = random.Random(7 + quotes + 2 * reasoning)
    texts = mangled(rng, SEEDS, 30000, '{}[]":,. \\n\\u0aeé\x01\t0-+') + [None, 5]
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
    assert read > 3000  # the fast path is taken for the plain answers


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


def test_typed_models_are_read_in_python():
    pydantic = pytest.importorskip("pydantic")

    class Row(pydantic.BaseModel):
        n: int

    assert OutputSpec(Row, False).row_reader() is None


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


@pytest.mark.parametrize("api", ["sync", "async", "frame"])
def test_extractions_with_and_without_the_c_reader_agree(server, make_lm, monkeypatch, api):
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
