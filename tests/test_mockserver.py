"""The benchmark mock provider (benchmarks/mock/) answers response_format requests
with schema-shaped JSON (see its --help). Builds it with `make -C benchmarks` (skipped
without a C compiler); MOCKSERVER_BIN=path runs the tests against another build, e.g.
benchmarks/build/mockserver-asan after `make -C benchmarks asan`."""
import enum
import json
import os
import selectors
import shutil
import subprocess
import urllib.request
from typing import List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fnv(text: str) -> str:
    """8 hex digits of the 32-bit FNV-1a of the text's UTF-8 bytes (the mock's rule)."""
    h = 0x811C9DC5
    for b in text.encode("utf-8", "surrogatepass"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return format(h, "08x")


def nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def mock_url():
    binary = os.environ.get("MOCKSERVER_BIN")
    if not binary:
        # The suite already needs make and a C compiler (it builds semex's engine): their
        # absence is a broken set-up, not a reason to skip.
        if not shutil.which("make") or not shutil.which(os.environ.get("CC", "cc")):
            pytest.fail("make and a C compiler are needed to build benchmarks/mockserver "
                        "(set MOCKSERVER_BIN to use a built one)")
        build = subprocess.run(["make", "-s", "-C", BENCH], capture_output=True, text=True,
                               timeout=120)
        if build.returncode != 0:
            pytest.fail("make -C benchmarks failed:\n" + build.stdout + build.stderr)
        binary = os.path.join(BENCH, "build", "mockserver")
    proc = subprocess.Popen([binary, "--port", "0", "--stdin-watch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=10):
            pytest.fail("mockserver did not print its port")
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1/chat/completions"
    finally:
        proc.stdin.close()  # --stdin-watch: EOF ends it
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == 0, err
        assert "ERROR" not in err and "runtime error" not in err, err  # ASan / UBSan


def post(url, body, raw: Optional[bytes] = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with _opener.open(req, timeout=5) as resp:
        out = json.loads(resp.read())
    assert isinstance(out["usage"]["completion_tokens"], int)
    return out["choices"][0]["message"]["content"]


def chat(user, response_format=None, system="You extract fields."):
    body = {"model": "mock", "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": user}]}
    if response_format is not None:
        body["response_format"] = response_format
    return body


def json_schema(schema, name="extraction"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


ROW = {"type": "object", "properties": {"answer": {"type": ["string", "null"]}},
       "required": ["answer"], "additionalProperties": False}
BATCH = {"type": "object",
         "properties": {"results": {"type": "array", "items": {
             "type": "object",
             "properties": {"id": {"type": "integer"}, "answer": {"type": ["string", "null"]}},
             "required": ["id", "answer"], "additionalProperties": False}}},
         "required": ["results"], "additionalProperties": False}
DOCS = ["[text]: prompt 0", "[text]: caf\u00e9 \U0001F600 \"quoted\" \\ back/slash\ttab",
        "[text]: line one\nline two"]


def batch_prompt(docs):
    return "\n\n".join([f"{len(docs)} documents:"]
                       + [f"Document {k}:\n{d}" for k, d in enumerate(docs, 1)])


def test_without_response_format_it_echoes(mock_url):
    assert post(mock_url, chat("prompt 42")) == "echo: prompt 42"


def test_json_schema_single_document(mock_url):
    for doc in DOCS:
        content = post(mock_url, chat("Document:\n" + doc + "\n\n", json_schema(ROW)))
        assert json.loads(content) == {"answer": f"answer:{fnv(doc)}"}


def test_escapes_and_raw_utf8_hash_the_same(mock_url):
    doc = DOCS[1]
    for ascii_only in (True, False):
        raw = json.dumps(chat("Document:\n" + doc, json_schema(ROW)),
                         ensure_ascii=ascii_only).encode()
        assert json.loads(post(mock_url, None, raw=raw)) == {"answer": f"answer:{fnv(doc)}"}


def test_whole_message_is_the_document_without_markers(mock_url):
    text = "just some text\n"
    content = post(mock_url, chat(text, {"type": "json_object", "schema": ROW}))
    assert json.loads(content) == {"answer": f"answer:{fnv(text)}"}
    assert json.loads(post(mock_url, chat(text, {"type": "json_object"}))) == \
        {"answer": f"answer:{fnv(text)}"}


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
def test_batch_one_item_per_numbered_document(mock_url, mode):
    rf = json_schema(BATCH, "extraction_batch") if mode == "json_schema" else \
        {"type": "json_object", "schema": BATCH}
    content = post(mock_url, chat(batch_prompt(DOCS), rf))
    assert json.loads(content) == {"results": [
        {"id": k, "answer": f"answer:{fnv(d)}"} for k, d in enumerate(DOCS, 1)]}


def test_every_type_and_defs(mock_url):
    schema = {
        "$defs": {
            "Color": {"enum": ["red", "green"], "title": "Color", "type": "string"},
            "Address": {"type": "object", "properties": {
                "city": {"type": "string"},
                "zip": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}}},
        },
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "score": {"type": "number"}, "active": {"type": "boolean"},
            "nothing": {"type": "null"}, "color": {"$ref": "#/$defs/Color"},
            "kind": {"const": {"a": [1, 2]}},
            "address": {"$ref": "#/$defs/Address"},
            "maybe": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Address"}]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "n": {"type": ["null", "integer"]},
        },
    }
    doc = DOCS[1]
    h, n = fnv(doc), nbytes(doc)
    address = {"city": f"city:{h}", "zip": n}
    content = post(mock_url, chat("Document:\n" + doc, json_schema(schema)))
    got = json.loads(content)
    assert got == {"name": f"name:{h}", "age": n, "score": float(n), "active": True,
                   "nothing": None, "color": "red", "kind": {"a": [1, 2]},
                   "address": address, "maybe": address, "tags": [f"tags:{h}"], "n": n}
    assert list(got) == list(schema["properties"])  # property order kept
    assert isinstance(got["score"], float)


def test_semex_pydantic_schemas(mock_url):
    pydantic = pytest.importorskip("pydantic")  # optional dependency of semex
    from semex import _schema as schema_mod

    class Color(enum.Enum):
        red = "red"
        green = "green"

    class Address(pydantic.BaseModel):
        city: str
        zip: Optional[int] = None

    class Person(pydantic.BaseModel):
        name: str
        age: int
        color: Color
        address: Address
        tags: List[str]
        nickname: Optional[str] = None

    spec = schema_mod.OutputSpec(Person, extract_quotes=False)

    def row(doc):
        h, n = fnv(doc), nbytes(doc)
        return {"name": f"name:{h}", "age": n, "color": "red",
                "address": {"city": f"city:{h}", "zip": n}, "tags": [f"tags:{h}"],
                "nickname": f"nickname:{h}"}

    for mode in ("json_schema", "json_object"):
        single = post(mock_url, chat("Document:\n" + DOCS[0],
                                     spec.response_format(mode, batch=False)))
        assert spec.validate(json.loads(single)) == row(DOCS[0])
        batch = json.loads(post(mock_url, chat(batch_prompt(DOCS),
                                               spec.response_format(mode, batch=True))))
        assert batch == {"results": [{"id": k, **row(d)} for k, d in enumerate(DOCS, 1)]}


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
    {"type": "object", "properties": {"a": {"type": "mystery"}}},
    {"type": "object", "properties": {"a": {"enum": []}}},
    {"type": "object", "properties": {"self": {"$ref": "#"}}},  # endless recursion
    {"$ref": "#"},
    {"type": "object", "properties": ["a", "b"]},
])
def test_unsupported_schemas_fall_back_to_the_echo(mock_url, schema):
    assert post(mock_url, chat("Document:\nx", json_schema(schema))) == "echo: Document:\nx"
    # and the server is still fine
    assert post(mock_url, chat("prompt 1")) == "echo: prompt 1"


def test_malformed_bodies_do_not_hurt(mock_url):
    good = json.dumps(chat(batch_prompt(DOCS), json_schema(BATCH))).encode()
    for cut in range(1, len(good), 7):
        req = urllib.request.Request(mock_url, data=good[:cut], method="POST")
        with _opener.open(req, timeout=5) as resp:
            assert resp.status == 200
            json.loads(resp.read())  # whatever it answered is valid JSON
    assert post(mock_url, chat("prompt 2")) == "echo: prompt 2"


def _stream(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with _opener.open(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return resp.read().decode("utf-8")


@pytest.mark.parametrize("rf", [None, json_schema(ROW)])
def test_stream_true_answers_the_same_as_events(mock_url, rf):
    body = chat(DOCS[1], rf)
    whole = post(mock_url, body)
    text = _stream(mock_url, {**body, "stream": True,
                              "stream_options": {"include_usage": True}})
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]  # every piece is whole JSON
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert "".join(d for d in deltas if d) == whole
    assert len(deltas) > 5  # really in pieces
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    # without include_usage: no usage chunk
    plain = _stream(mock_url, {**body, "stream": True})
    assert "usage" not in plain and plain.endswith("data: [DONE]\n\n")


def test_semex_streams_from_the_mock(mock_url):
    import semex
    lm = semex.LM("mock", api_base=mock_url.rsplit("/chat/completions", 1)[0], api_key="k")
    try:
        prompts = [f"prompt {i} caf\u00e9 \U0001F600 \"q\"" for i in range(50)]
        whole = semex.llm_batch(prompts, model=lm)
        got = {}
        streamed = semex.llm_batch(prompts, model=lm,
                                   on_chunk=lambda i, t: got.setdefault(i, []).append(t))
        assert streamed == whole and all(not isinstance(r, Exception) for r in whole)
        assert all("".join(got[i]) == whole[i] for i in range(50))
    finally:
        lm.close()
@pytest.mark.parametrize("dims", [None, 3, 1536])
def test_embeddings_as_numbers_and_as_base64_agree(mock_url, dims):
    """The benchmark's embeddings: the same vectors as JSON numbers and as base64 float32,
    read by semex's C reader; `dimensions` sets their length (default 8)."""
    import numpy as np

    import semex

    base = mock_url.rsplit("/chat/completions", 1)[0]
    texts = [f"chunk {i} " * (i % 5 + 1) for i in range(37)]
    got = {}
    for fmt in ("float", "base64"):
        rm = semex.EmbeddingModel("m", api_base=base, dimensions=dims, encoding_format=fmt,
                                  max_batch_inputs=10)
        try:
            got[fmt] = semex.embed(texts, rm, progress=False)
        finally:
            rm.close()
    assert got["float"].shape == (len(texts), dims or 8)
    assert np.array_equal(got["float"], got["base64"])
    assert (np.abs(got["float"]) <= 1).all() and len({r.tobytes() for r in got["float"]}) == 37
