"""semex.embed / EmbeddingModel against the fake server's /v1/embeddings.

The fake answers each input with embedding_of(text) (tests/fakeserver.py), so every vector
is checked exactly, in input order, whichever reader (C or json.loads) read it.
"""
import asyncio
import base64
import json
import logging
import math
import random
import re
import struct

import numpy as np
import pytest

import semex
from semex import errors as E
from fakeserver import embedding_of


@pytest.fixture
def make_rm(server):
    from conftest import client_factory

    yield from client_factory(
        server, lambda **o: semex.EmbeddingModel("test-embed", **o), 0.02, 0.2)


def expected(texts, dim=16):
    return np.array([embedding_of(t, dim) for t in texts], dtype=np.float32)


def embedding_requests(server):
    return [r for r in server.log() if r.get("embeddings")]


TEXTS = [f"document {i} about topic {i % 7} and more words {i * 3}" for i in range(40)]


@pytest.mark.parametrize("encoding_format", ["base64", "float", None])
def test_vectors_come_back_exactly_in_input_order(make_rm, server, encoding_format, caplog):
    rm = make_rm(max_batch_inputs=7, encoding_format=encoding_format)
    server.configure(latency_ms=[0, 20])  # answers land out of order
    with caplog.at_level(logging.DEBUG, logger="semex"):
        out = semex.embed(TEXTS, rm, progress=False)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    assert out.shape == (len(TEXTS), 16)
    assert np.array_equal(out, expected(TEXTS))
    reqs = embedding_requests(server)
    assert sorted(r["ninputs"] for r in reqs) == [5] + [7] * 5
    assert all(r["encoding_format"] == encoding_format for r in reqs)
    assert not any("json.loads" in m for m in caplog.messages)  # all read in C


def test_identical_texts_are_requested_once(make_rm, server):
    rm = make_rm()
    texts = ["alpha beta", "gamma", "alpha beta", "gamma", "delta", "alpha beta"]
    out, usage = None, None
    result = rm(texts)
    out, usage = result.embeddings, result.usage
    assert np.array_equal(out, expected(texts))
    sent = [t for r in embedding_requests(server) for t in r["inputs"]]
    assert sorted(sent) == ["alpha beta", "delta", "gamma"]
    assert usage.cache_hits == 3 and usage.requests == 1 and usage.prompt_tokens == 4


def test_requests_are_split_by_estimated_tokens(make_rm, server):
    rm = make_rm(max_batch_inputs=100, max_batch_tokens=30)
    texts = ["x" * 40 + f" {i}" for i in range(9)]  # ~11 estimated tokens each
    out = semex.embed(texts, rm, progress=False)
    assert np.array_equal(out, expected(texts))
    assert sorted(r["ninputs"] for r in embedding_requests(server)) == [1, 2, 2, 2, 2]


def test_batch_size_and_dimensions_are_sent(make_rm, server):
    rm = make_rm(dimensions=8)
    out = semex.embed(TEXTS[:10], rm, batch_size=4, progress=False)
    assert np.array_equal(out, expected(TEXTS[:10], 8))
    reqs = embedding_requests(server)
    assert sorted(r["ninputs"] for r in reqs) == [2, 4, 4]
    assert all(r["dimensions"] == 8 for r in reqs)


def test_a_text_too_large_is_its_rows_error_and_is_not_sent(make_rm, server):
    rm = make_rm(max_input_tokens=10)
    texts = ["short one", "y" * 200, "short two"]
    with pytest.raises(E.BatchError) as info:
        semex.embed(texts, rm, progress=False)
    err = info.value
    assert [e is None for e in err.errors] == [True, False, True]
    assert isinstance(err.errors[1], E.InputTooLargeError) and "texts[1]" in str(err.errors[1])
    assert "max_input_tokens=10" in str(err.errors[1])
    assert np.array_equal(err.results[[0, 2]], expected([texts[0], texts[2]]))
    assert np.isnan(err.results[1]).all()
    assert "y" * 200 not in [t for r in embedding_requests(server) for t in r["inputs"]]


@pytest.mark.parametrize("texts, message", [
    (["ok", None], "texts[1] is None"),
    (["ok", "fine", float("nan")], "texts[2] is NaN"),
    (["ok", 5], "texts[1] must be a str, got int"),
    (["ok", ""], "texts[1] is an empty string"),
    ([], "texts is empty"),
    ("just one string", "not a single string"),
    (42, "must be a list of strings"),
])
def test_bad_texts_name_the_row_before_any_request(make_rm, server, texts, message):
    rm = make_rm()
    with pytest.raises(E.ConfigurationError, match=re.escape(message)):
        semex.embed(texts, rm, progress=False)
    assert embedding_requests(server) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": -3}, "batch_size must be an integer >= 1"),
    ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ({"on_error": "ignore"}, "on_error must be"),
])
def test_bad_call_parameters_are_named(make_rm, server, kwargs, message):
    rm = make_rm()
    with pytest.raises(E.ConfigurationError, match=message):
        semex.embed(["a"], rm, progress=False, **kwargs)
    assert embedding_requests(server) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"dimensions": 0}, "dimensions"),
    ({"max_batch_inputs": 0}, "max_batch_inputs"),
    ({"encoding_format": "hex"}, "encoding_format"),
    ({"api_base": "ftp://x"}, "api_base"),
])
def test_bad_model_parameters_are_named(kwargs, message):
    kwargs.setdefault("api_key", "sk-x")
    with pytest.raises(E.ConfigurationError, match=message):
        semex.EmbeddingModel("m", **kwargs)


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_answers_with_missing_shuffled_or_odd_vectors(make_rm, encoding_format):
    rm = make_rm(encoding_format=encoding_format)
    texts = ["one [[emb_shuffle]]", "two", "three [[emb_drop]]", "four [[emb_len=5]]",
             "five [[emb_dup]]", "six"]
    with pytest.raises(E.BatchError) as info:
        semex.embed(texts, rm, progress=False)
    errors, out = info.value.errors, info.value.results
    ok = [0, 1, 5]
    assert [i for i, e in enumerate(errors) if e is None] == ok
    assert np.array_equal(out[ok], expected([texts[i] for i in ok]))  # each at its index
    assert "texts[2]" in str(errors[2]) and "no vector for it" in str(errors[2])
    assert "texts[3]" in str(errors[3]) and "5 numbers where the others have 16" in str(errors[3])
    assert "differing lengths" in str(errors[3])
    assert "texts[4]" in str(errors[4]) and "duplicate index" in str(errors[4])
    assert all(isinstance(errors[i], E.ResponseFormatError) for i in (2, 3, 4))
    assert np.isnan(out[[2, 3, 4]]).all()


def test_an_index_out_of_range_is_reported_on_the_missing_row(make_rm):
    rm = make_rm()
    texts = ["a [[emb_oob]]", "b [[emb_drop]]"]
    with pytest.raises(E.BatchError) as info:
        semex.embed(texts, rm, progress=False)
    assert info.value.errors[0] is None
    assert "index outside 0..1" in str(info.value.errors[1])


def test_a_server_that_ignores_dimensions_is_named(make_rm):
    rm = make_rm(dimensions=8)
    semex.embed(["learn the dimension"], rm, progress=False)
    with pytest.raises(E.BatchError) as info:
        semex.embed(["p [[emb_nodims]]", "q"], rm, progress=False)
    for i in (0, 1):
        assert "dimensions=8 was asked" in str(info.value.errors[i])
        assert "16 numbers" in str(info.value.errors[i])


def test_items_without_index_are_read_in_order_by_json_loads(make_rm, caplog):
    rm = make_rm()
    texts = ["first [[emb_noindex]]", "second", "third"]
    with caplog.at_level(logging.DEBUG, logger="semex"):
        out = semex.embed(texts, rm, progress=False)
    assert np.array_equal(out, expected(texts))
    assert any("json.loads" in m for m in caplog.messages)


def test_failed_requests_keep_the_other_rows(make_rm, server):
    rm = make_rm(max_batch_inputs=2, max_retries=1)
    texts = ["a", "b", "c [[fail=400]]", "d", "e [[fail=500*1]]", "f"]
    with pytest.raises(E.BatchError) as info:
        semex.embed(texts, rm, progress=False)
    errors, out = info.value.errors, info.value.results
    assert [i for i, e in enumerate(errors) if e is not None] == [2, 3]
    assert isinstance(errors[2], E.APIStatusError) and errors[2].status == 400
    assert errors[3].index == 3 and "texts[3]" in str(errors[3])
    good = [0, 1, 4, 5]
    assert np.array_equal(out[good], expected([texts[i] for i in good]))
    assert np.isnan(out[[2, 3]]).all()
    with pytest.warns(E.PartialFailureWarning, match="embed: 2 of 6 texts failed"):
        kept = semex.embed(texts, rm, progress=False, on_error="return")
    assert np.array_equal(kept[good], out[good]) and np.isnan(kept[[2, 3]]).all()


def test_a_duplicate_of_a_failed_text_fails_too(make_rm):
    rm = make_rm(max_retries=0, max_batch_inputs=1)
    texts = ["bad [[fail=422]]", "good", "bad [[fail=422]]"]
    result = rm(texts)
    assert [e is not None for e in result.errors] == [True, False, True]
    assert result.errors[2].index == 2 and "texts[2]" in str(result.errors[2])
    assert result.usage.failed == 2


def test_no_key_for_a_public_api_fails_at_construction(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(E.ConfigurationError, match="no API key for https://api.openai.com"):
        semex.EmbeddingModel()
    assert semex.EmbeddingModel(api_base="http://127.0.0.1:9/v1").url.endswith("/embeddings")


def test_the_key_is_never_shown(make_rm, server):
    rm = make_rm(api_key="sk-wrong-SECRET-999")
    assert "SECRET" not in repr(rm)
    with pytest.raises(E.BatchError) as info:
        semex.embed(["a", "b"], rm, progress=False)
    assert isinstance(info.value.errors[0], E.AuthenticationError)
    assert "SECRET" not in str(info.value) and "SECRET" not in str(info.value.errors[0])
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(rm)


def test_async_matches_sync_and_progress_reports_inputs(make_rm):
    rm = make_rm(max_batch_inputs=5)
    seen = []
    out = asyncio.run(semex.embed_async(TEXTS, rm, progress=lambda d, t: seen.append((d, t))))
    assert np.array_equal(out, expected(TEXTS))
    assert seen[-1] == (len(TEXTS), len(TEXTS))
    assert all(d <= t for d, t in seen)


def test_settings_rm_is_the_default(make_rm):
    rm = make_rm()
    old = semex.settings.rm
    try:
        semex.settings.configure(rm=rm)
        assert np.array_equal(semex.embed(["via settings"], progress=False),
                              expected(["via settings"]))
    finally:
        semex.settings.rm = old


def test_a_callable_model_runs_in_worker_threads():
    import threading

    callers = set()

    def model(batch):
        callers.add(threading.current_thread().name)
        return [[len(t), 1.0] for t in batch]

    texts = [f"t{'x' * i}" for i in range(10)]
    out = semex.embed(texts, model, batch_size=3, max_concurrent=2)
    assert out.shape == (10, 2) and out.dtype == np.float32
    assert out[:, 0].tolist() == [len(t) for t in texts]
    assert all(name.startswith("semex-embed") for name in callers)
    out2 = asyncio.run(semex.embed_async(texts, model, batch_size=4))
    assert np.array_equal(out, out2)
    with pytest.raises(E.ConfigurationError, match=r"returned shape \(1,\)"):
        semex.embed(["a"], lambda batch: [1.0])


# -- the C reader gives exactly float32(json.loads(x)) ---------------------------------------

def _number_texts(rng):
    """Numbers in every spelling providers (and adversaries) use."""
    out = []
    for _ in range(400):
        kind = rng.randrange(8)
        x = rng.uniform(-1, 1) * 10 ** rng.randint(-8, 3)
        if kind == 0:
            out.append(repr(x))                          # shortest round-trip double
        elif kind == 1:
            out.append(repr(float(np.float32(x))))       # a float32 value
        elif kind == 2:
            out.append("%.*e" % (rng.randint(0, 20), x))   # exponent forms
        elif kind == 3:
            out.append("%.*f" % (rng.randint(0, 25), x))   # long fractions
        elif kind == 4:
            out.append(str(rng.randint(-10 ** 6, 10 ** 6)))  # integers
        elif kind == 5:
            out.append("%dE%+d" % (rng.randint(1, 99), rng.randint(-50, 30)))
        elif kind == 6:
            out.append("0." + "".join(rng.choice("0123456789") for _ in range(30)))
        else:
            # a float32 halfway point between neighbours, written exactly: double rounding
            # makes json.loads + float32 the reference, not a single rounding
            f = np.float32(rng.uniform(-2, 2))
            g = np.nextafter(f, np.float32(3))
            out.append(repr((float(f) + float(g)) / 2))
    out += ["0", "-0", "-0.0", "1e-45", "1.4e-45", "1e-50", "3.4028234e38", "-3.4028235e38",
            "123456789012345678901234567890", str(2 ** 60 + 2 ** 36 + 1), "-0e5", "-0.000", "0.1", "2.5e-8", "1E5", "1e+2", "9007199254740993"]
    return out


def test_float_reading_equals_json_loads_then_float32(make_rm, caplog):
    rng = random.Random(1234)
    numbers = _number_texts(rng)
    dim = 50
    while len(numbers) % dim:
        numbers.append("0.5")
    vectors = [numbers[i:i + dim] for i in range(0, len(numbers), dim)]
    n = len(vectors)
    items = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}'
                     % (n - 1 - i, ", ".join(v)) for i, v in enumerate(reversed(vectors)))
    body = ('{"object":"list","data":[%s],"usage":{"prompt_tokens":3,"total_tokens":3}}'
            % items).encode()
    raw = base64.urlsafe_b64encode(body).decode()
    texts = [f"[[rawb64={raw}]]"] + [f"filler {i}" for i in range(1, n)]
    rm = make_rm(dimensions=dim, max_batch_inputs=n)
    with caplog.at_level(logging.DEBUG, logger="semex"):
        out = semex.embed(texts, rm, progress=False)
    reference = np.array([[json.loads(x) for x in v] for v in vectors], dtype=np.float32)
    assert np.array_equal(out.view(np.uint32), reference.view(np.uint32))  # -0.0 included
    assert not any("json.loads" in m for m in caplog.messages)


def test_base64_and_fallback_bodies_read_the_same(make_rm, caplog):
    dim = 4
    vec = [0.25, -1.5, float(np.float32(0.1)), 7.0]
    b64 = base64.b64encode(struct.pack("<4f", *vec)).decode()
    bodies = {
        "b64": '{"data":[{"index":0,"embedding":"%s"}]}' % b64,
        "escaped": '{"data":[{"index":0,"embedding":"%s"}]}' % b64.replace("/", "\\/"),
        "nan_literal": '{"data":[{"index":0,"embedding":[NaN, 1, 2, 3]}]}',
        "dup_key": '{"data":[{"index":0,"embedding":[9, 9, 9, 9],"embedding":[1, 2, 3, 4]}]}',
        "usage_float": '{"data":[{"index":0,"embedding":[1, 2, 3, 4]}],"usage":{"prompt_tokens":1.5}}',
    }
    rm = make_rm(dimensions=dim)
    got = {}
    for name, body in bodies.items():
        raw = base64.urlsafe_b64encode(body.encode()).decode()
        got[name] = semex.embed([f"[[rawb64={raw}]]"], rm, progress=False)[0]
    assert got["b64"].tolist() == got["escaped"].tolist() == [np.float32(v) for v in vec]
    assert math.isnan(got["nan_literal"][0]) and got["nan_literal"][1:].tolist() == [1, 2, 3]
    assert got["dup_key"].tolist() == got["usage_float"].tolist() == [1, 2, 3, 4]


def test_an_index_that_is_not_an_integer_leaves_its_row_missing(make_rm):
    rm = make_rm(dimensions=4)
    body = b'{"data":[{"index":0.0,"embedding":[1, 2, 3, 4]}]}'
    raw = base64.urlsafe_b64encode(body).decode()
    with pytest.raises(E.BatchError, match=r"texts\[0\]: .*no vector for it"):
        semex.embed([f"[[rawb64={raw}]]"], rm, progress=False)


def test_an_unreadable_answer_is_each_rows_error(make_rm):
    rm = make_rm(dimensions=4)
    raw = base64.urlsafe_b64encode(b'{"data": 5}').decode()
    with pytest.raises(E.BatchError) as info:
        semex.embed([f"x [[rawb64={raw}]]", "y"], rm, progress=False)
    for i in (0, 1):
        assert isinstance(info.value.errors[i], E.ResponseFormatError)
        assert f"texts[{i}]" in str(info.value.errors[i])


def _mutations(rng, body: bytes, count: int):
    """Truncations, byte flips, deletions and duplications of a valid answer."""
    out = []
    for _ in range(count):
        b = bytearray(body)
        kind = rng.randrange(4)
        at = rng.randrange(len(b))
        if kind == 0:
            b = b[:at]
        elif kind == 1:
            b[at] = rng.choice(b'{}[]",:0123456789-+.eE \\/=AZaz\x00\xff')
        elif kind == 2:
            del b[at:at + rng.randint(1, 8)]
        else:
            b[at:at] = b[at:at + rng.randint(1, 12)]
        out.append(bytes(b))
    return out


def test_the_c_reader_agrees_with_json_loads_on_mangled_answers(make_rm, monkeypatch):
    """Whatever a broken provider sends, the C reader either reads exactly what the
    json.loads reader reads (same rows filled, same values, same row errors) or leaves it
    to that reader."""
    import importlib

    embed_module = importlib.import_module("semex.embed")  # semex.embed is the function

    rng = random.Random(7)
    dim = 3
    vectors = [[0.5, -1.25, 3.0e-3], [2.0, 0.0, -0.0]]
    float_body = json.dumps({"object": "list", "data": [
        {"object": "embedding", "index": 1, "embedding": vectors[1]},
        {"object": "embedding", "index": 0, "embedding": vectors[0]}],
        "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()
    b64 = [base64.b64encode(struct.pack("<3f", *v)).decode() for v in vectors]
    b64_body = ('{"data":[{"index":0,"embedding":"%s"},{"index":1,"embedding":"%s"}],'
                '"usage":{"prompt_tokens":2}}' % tuple(b64)).encode()
    bodies = _mutations(rng, float_body, 150) + _mutations(rng, b64_body, 150)
    texts = []
    for i, body in enumerate(bodies):
        raw = base64.urlsafe_b64encode(body).decode()
        texts += [f"[[rawb64={raw}]] {i}", f"second {i}"]  # two inputs per request

    def run():
        rm = make_rm(dimensions=dim, max_batch_inputs=2, max_retries=0)
        out = rm(texts)
        return out.embeddings, [None if e is None else str(e) for e in out.errors]

    fast, fast_errors = run()
    monkeypatch.setattr(embed_module, "_C_READER", False)
    slow, slow_errors = run()
    assert fast_errors == slow_errors
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))
    assert 0 < sum(e is None for e in fast_errors) < len(texts)  # both kinds were seen
