#!/usr/bin/env python3
"""OpenAI-compatible fake chat-completions server with fault-injection knobs.

Stdlib only (asyncio streams, hand-written HTTP/1.1). Run:

    python tests/fakeserver.py --port 0 [--host 127.0.0.1] [--api-key KEY]

Once listening it prints ``PORT <n>`` on stdout. It exits on SIGTERM/SIGINT or
when stdin reaches EOF (disable with ``--no-stdin-watch``).

The *key* of a chat request is the content of its last message. Directives in
the key (``[[name]]`` / ``[[name=value]]``, ``*N`` = only attempts 1..N):

    [[lat=MS]]  [[fail=CODE*N]]  [[fail=CODE]]  [[retry_after=S]]
    [[retry_after_date=S]]  [[retry_after_ms=MS]]  [[reset_requests=V]]
    [[reset_tokens=V]]  [[quota]]  [[drop*N]]  [[truncate*N]]  [[stall*N]]
    [[big=N]]  [[badjson]]  [[rawb64=BASE64]] (answer 200 with exactly these body bytes,
    base64 in the URL-safe alphabet; with [[sse]] as Content-Type text/event-stream)
    [[refuse]] (400 content_filter, as a provider's content filter answers; in extraction mode it refuses every prompt holding that
    document, batch or single)  [[maxlen=N]] (400 context_length_exceeded when the
    last message is longer than N characters)  [[ids=PREFIX]] (answer with the distinct
    words starting with PREFIX in the last message, in order: a summarizer that shrinks)
    [[rawstatus=CODE]] (with rawb64: answer with this status instead of 200)
    [[hdrb64=BASE64]] (add these raw header lines, "Name: value" separated by "\n",
    latin-1, URL-safe base64, to every response to this request, whatever its status)

Streaming: a request with "stream": true (or the directive [[sse]]) is answered with
server-sent events (Content-Type: text/event-stream, chunked): the content in
chat.completion.chunk deltas of 3 characters, a finish_reason chunk, a usage chunk when
stream_options.include_usage is true, then "data: [DONE]". Directives (``*N`` as above):
    [[stream_cut*N]]    end the response cleanly half-way (no finish_reason, no [DONE])
    [[stream_close*N]]  close the connection half-way (an incomplete chunked body)
    [[stream_error*N]] / [[stream_error=CODE*N]]  an error object half-way (with "code":
                        CODE when given), then end
    [[stream_stall*N]]  stop half-way and wait (like [[stall]])
    [[stream_nodone]]   no [DONE] after the finish_reason chunk
    [[stream_ascii]]    chunks with JSON escapes for non-ASCII (surrogate pairs)
    [[stream_odd]]      CRLF line breaks, ": ping" comments, event:/id: fields, data split
                        over two data: lines, every event written in two pieces

Extraction mode: if the first message is a system message containing "You
extract structured information", the request is a sem_extract prompt
("Document:\n..." or "<k> documents:\n\nDocument 1:\n..."). The answer holds
one row per document, computed from the document's doc_id (first line minus
its "[column]: " prefix and directives) and the row schema in
response_format (or the keys listed in the system prompt): "<key>:<doc_id>"
for strings, doc_id for "*_quote", len(doc_id) for integers, len/2 for
numbers, len%2==0 for booleans, enum[len % n] for enums, doc_id.split() for
string arrays. Per-document directives: [[null]] [[invalid_once]]
[[invalid_always]] [[fence]] [[prose]] and, for batches, [[batch_short]]
[[batch_long]] [[batch_reorder]] [[batch_bad_ids]] [[batch_badjson]]
[[batch_fence]] [[overflow]]. Request-level directives above still apply.
/_log records carry "ndocs" and "doc_ids".

Embeddings (POST .../embeddings): one vector per input, deterministic from the text
(embedding_of(): hashed bag of words, unit length, float32 values; `dimensions` gives the
length, default 16; encoding_format "base64" is honoured). The request-level directives
above apply to the first input that carries any. Per input: [[emb_drop]] (no vector for
it), [[emb_len=N]] (a vector of length N), [[emb_dup]] (its vector twice). Per request,
in any input: [[emb_shuffle]] (items in reverse index order), [[emb_nodims]] (ignore
`dimensions`), [[emb_oob]] (one extra item at index n), [[emb_noindex]] (items without
"index"). /_log records of embeddings carry "ninputs", "inputs" and the request's
"dimensions"/"encoding_format".

Native dialects: POST .../v1/messages is Anthropic's Messages API and
POST .../models/{model}:generateContent Gemini's, served by the same chat logic (every
directive above applies) after checking what each API requires -- Anthropic: the key in
x-api-key (401 authentication_error otherwise), anthropic-version: 2023-06-01, max_tokens,
no "system" role among the messages, user/assistant turns; Gemini: the key in
x-goog-api-key (400 INVALID_ARGUMENT "API key not valid" otherwise), contents with
user/model roles and parts. A violation is a 400 in the API's own error shape. Answers,
errors and hints are in the API's shapes: Anthropic's content blocks (a tool_use block
when a tool is forced and the answer is a JSON object), usage input/output_tokens,
{"type": "error", "error": {"type": ..._error}} (a 529 is overloaded_error), retry-after in
whole seconds and anthropic-ratelimit-{requests,tokens}-{remaining,reset} (RFC 3339) in
place of x-ratelimit-*; Gemini's candidates/usageMetadata, {"error": {"code", "message",
"status": RESOURCE_EXHAUSTED | UNAVAILABLE | ...}} with the retry delay of a 429/503 in a
google.rpc.RetryInfo detail ("retryDelay": "0.7s") and no rate-limit headers. /_log
records carry "dialect", "native" (the request body as sent) and "headers_seen".
Directives for them: [[blocked=REASON]] (Gemini: a candidate without content and that
finishReason; Anthropic: stop_reason "refusal"), [[prompt_blocked=REASON]] (Gemini: no
candidate, promptFeedback.blockReason), [[parts]] (the answer in several text parts or
blocks, with a thought part / thinking block first), [[cache_tokens]] (Anthropic: usage
with cache_creation/cache_read_input_tokens).

Control endpoints (no auth, not counted as chat requests):
    POST /_config {"latency_ms": [lo, hi], "rpm": N}
    POST /_reset
    GET  /_log
    GET  /_stats
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import math
import os
import random
import re
import signal
import struct
import sys
import threading
import time

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
READ_SIZE = 65536
STALL_SECONDS = 60.0

_monotonic = time.monotonic
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_DIRECTIVE_RE = re.compile(r"\[\[([^\[\]]*)\]\]")

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Payload Too Large", 422: "Unprocessable Entity",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}

# status -> (message, type, code) for OpenAI-style error bodies
ERRORS = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to access this resource.", "invalid_request_error", None),
    404: ("The model does not exist or you do not have access to it.",
          "invalid_request_error", "model_not_found"),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict: the request could not be completed.", "invalid_request_error", None),
    429: ("Rate limit reached for requests. Please try again later.",
          "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.",
          "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}

QUOTA_BODY = _dumps({"error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}).encode()
AUTH_BODY = _dumps({"error": {
    "message": "Incorrect API key provided.", "type": "invalid_request_error",
    "code": "invalid_api_key"}}).encode()
OK_BODY = b'{"ok":true}'
REFUSAL_BODY = _dumps({"error": {
    "message": "This prompt was refused: the content filter flagged it.",
    "type": "invalid_request_error", "param": "prompt", "code": "content_filter"}}).encode()


def error_body(status: int, message: str | None = None) -> bytes:
    msg, typ, code = ERRORS.get(
        status, ("Simulated error (HTTP %d)." % status,
                 "server_error" if status >= 500 else "invalid_request_error", None))
    return _dumps({"error": {"message": message or msg, "type": typ,
                             "param": None, "code": code}}).encode()


class ClientGone(Exception):
    """The peer closed (or reset) the connection."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------- state

class State:
    def __init__(self, api_key: str | None):
        self.api_key = api_key
        self.expected_auth = ("Bearer " + api_key) if api_key is not None else None
        self.open_connections = 0
        self.chat_counter = 0
        self.tasks: set[asyncio.Task] = set()
        self.reset()

    def reset(self) -> None:
        self.log: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.extract_seen: dict[str, int] = {}  # doc_id -> rows produced (extraction mode)
        self.latency = (0.0, 0.0)  # seconds
        self.rpm: float | None = None
        self.bucket_tokens = 0.0
        self.bucket_cap = 0.0
        self.bucket_t = _monotonic()
        self.total_connections = 0
        self.requests = 0
        self.client_closed = 0
        self.in_flight = 0       # chat requests being handled right now
        self.max_in_flight = 0   # the most at once since the last reset

    def configure(self, cfg: dict) -> None:
        if "latency_ms" in cfg:
            lat = cfg["latency_ms"]
            if lat is None:
                lo = hi = 0.0
            elif isinstance(lat, (int, float)):
                lo = hi = float(lat)
            else:
                lo, hi = float(lat[0]), float(lat[1])
            if hi < lo:
                lo, hi = hi, lo
            self.latency = (max(0.0, lo) / 1000.0, max(0.0, hi) / 1000.0)
        if "rpm" in cfg:
            rpm = cfg["rpm"]
            if rpm is None or float(rpm) <= 0:
                self.rpm = None
            else:
                self.rpm = float(rpm)
                self.bucket_cap = max(1.0, self.rpm / 60.0)
                self.bucket_tokens = self.bucket_cap
                self.bucket_t = _monotonic()

    def take_token(self) -> float:
        """Return 0 if the request may proceed, else seconds until a token."""
        if self.rpm is None:
            return 0.0
        rate = self.rpm / 60.0
        now = _monotonic()
        self.bucket_tokens = min(self.bucket_cap,
                                 self.bucket_tokens + (now - self.bucket_t) * rate)
        self.bucket_t = now
        if self.bucket_tokens >= 1.0:
            self.bucket_tokens -= 1.0
            return 0.0
        return (1.0 - self.bucket_tokens) / rate


STATE: State  # set in main()


# ----------------------------------------------------------------- connection I/O

class Conn:
    __slots__ = ("reader", "writer", "buf", "eof", "counted")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.counted = True

    async def _fill(self) -> None:
        if self.eof:
            raise ClientGone()
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            raise ClientGone()
        self.buf += data

    async def read_head(self) -> bytes | None:
        """Bytes of the request head (without the blank line); None on clean EOF."""
        buf = self.buf
        start = 0
        while True:
            idx = buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                head = bytes(buf[:idx])
                del buf[:idx + 4]
                return head
            if len(buf) > MAX_HEAD:
                raise BadRequest(431, "Request header too large.")
            start = max(0, len(buf) - 3)
            try:
                await self._fill()
            except ClientGone:
                if buf.strip():
                    raise
                return None

    async def read_exact(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            await self._fill()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def read_line(self) -> bytes:
        buf = self.buf
        start = 0
        while True:
            idx = buf.find(b"\r\n", start)
            if idx >= 0:
                line = bytes(buf[:idx])
                del buf[:idx + 2]
                return line
            if len(buf) > MAX_HEAD:
                raise BadRequest(400, "Chunk line too long.")
            start = max(0, len(buf) - 1)
            await self._fill()

    async def read_chunked(self) -> bytes:
        parts = []
        total = 0
        while True:
            line = await self.read_line()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest(400, "Bad chunk size.")
            if size < 0:
                raise BadRequest(400, "Bad chunk size.")
            if size == 0:
                while await self.read_line():  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise BadRequest(413, "Request body too large.")
            parts.append(await self.read_exact(size))
            if await self.read_exact(2) != b"\r\n":
                raise BadRequest(400, "Bad chunk terminator.")

    async def wait(self, delay: float) -> bool:
        """Sleep `delay` seconds; return True early if the client disconnects."""
        if self.eof:
            return True
        deadline = _monotonic() + delay
        reader = self.reader
        while True:
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return False
            if len(self.buf) > MAX_BODY:  # pipelined flood: stop reading
                await asyncio.sleep(remaining)
                return False
            t = asyncio.ensure_future(reader.read(READ_SIZE))
            try:
                done, _ = await asyncio.wait((t,), timeout=remaining)
            except BaseException:
                t.cancel()
                raise
            if not done:
                # Stop the read, and let it finish: asyncio.wait raises CancelledError only
                # when this handler itself is cancelled, never for the read we cancelled
                # (Task.cancelling() would tell the two apart, but only from Python 3.11).
                t.cancel()
                await asyncio.wait((t,))
                if t.cancelled():
                    return False
            try:
                data = t.result()
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.eof = True
                return True
            self.buf += data  # pipelined bytes of the next request

    async def send(self, data: bytes) -> None:
        w = self.writer
        if w.transport.is_closing():
            raise ClientGone()
        w.write(data)
        try:
            await w.drain()
        except (ConnectionError, OSError):
            raise ClientGone()


def build_response(status: int, body: bytes, keep_alive: bool,
                   ctype: str = "application/json",
                   extra: list[tuple[str, str]] | None = None,
                   content_length: int | None = None) -> bytes:
    head = ["HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            % (status, REASONS.get(status, "Status"), ctype,
               len(body) if content_length is None else content_length)]
    if extra:
        for k, v in extra:
            head.append("%s: %s\r\n" % (k, v))
    head.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
    return "".join(head).encode("latin-1") + body


# ----------------------------------------------------------------- chat logic

def parse_directives(key: str) -> dict:
    """`[[name=value]]` / `[[name*N=value]]` / `[[name=value*N]]` -> {name: (value, N)}."""
    out = {}
    for m in _DIRECTIVE_RE.finditer(key):
        inner = m.group(1).strip()
        name, sep, value = inner.partition("=")
        name = name.strip()
        value = value.strip() if sep else None
        count = None
        if "*" in name:
            name, _, c = name.partition("*")
            name = name.strip()
            count = c.strip()
        elif value is not None and name in ("fail", "drop", "truncate", "stall",
                                            "stream_error") and "*" in value:
            value, _, c = value.rpartition("*")
            value = value.strip()
            count = c.strip()
        n = None
        if count:
            try:
                n = int(count)
            except ValueError:
                n = None
        out[name] = (value, n)
    return out


def applies(d: dict, name: str, attempt: int) -> bool:
    v = d.get(name)
    if v is None:
        return False
    n = v[1]
    return n is None or attempt <= n


def content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    if content is None:
        return ""
    return str(content)


def failure_headers(d: dict) -> list[tuple[str, str]]:
    extra = []
    v = d.get("retry_after")
    if v and v[0] is not None:
        extra.append(("Retry-After", v[0]))
    v = d.get("retry_after_date")
    if v and v[0] is not None:
        try:
            secs = float(v[0])
        except ValueError:
            secs = 0.0
        extra.append(("Retry-After", email.utils.formatdate(time.time() + secs, usegmt=True)))
    v = d.get("retry_after_ms")
    if v and v[0] is not None:
        extra.append(("retry-after-ms", v[0]))
    v = d.get("reset_requests")
    if v and v[0] is not None:
        extra.append(("x-ratelimit-remaining-requests", "0"))
        extra.append(("x-ratelimit-reset-requests", v[0]))
    v = d.get("reset_tokens")
    if v and v[0] is not None:
        extra.append(("x-ratelimit-remaining-tokens", "0"))
        extra.append(("x-ratelimit-reset-tokens", v[0]))
    return extra


# ----------------------------------------------------------------- extraction mode
#
# A chat request whose first message is a system message containing
# EXTRACT_MARKER is answered as sem_extract's model would be: one row per
# document, computed deterministically from the document's doc_id (its first
# line, minus the "[column]: " prefix and any [[directives]]). See
# build_extraction() for the value rules and the per-document directives:
#   [[null]] [[invalid_once]] [[invalid_always]] [[fence]] [[prose]]
#   [[batch_short]] [[batch_long]] [[batch_reorder]] [[batch_bad_ids]]
#   [[batch_badjson]] [[batch_fence]] [[overflow]]

EXTRACT_MARKER = "You extract structured information"
_BATCH_HEAD_RE = re.compile(r"(\d+) documents:")
_BATCH_SPLIT_RE = re.compile(r"\n\nDocument (\d+):\n")
_JSON_STR_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_RETRY_CUT = "\n\nA previous answer"
OVERFLOW_BODY = _dumps({"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your "
               "messages resulted in 9000 tokens.",
    "type": "invalid_request_error", "param": "messages",
    "code": "context_length_exceeded"}}).encode()
_INVALID_KINDS = ("integer", "number", "boolean", "enum")


class Extraction:
    """What an extraction-mode request asks for."""
    __slots__ = ("batch", "keys", "row_schema", "defs", "docs", "doc_ids", "doc_dirs")

    def __init__(self):
        self.batch = False
        self.keys: list[str] = []
        self.row_schema: dict | None = None   # None: every key is a string
        self.defs: dict = {}
        self.docs: list[str] = []
        self.doc_ids: list[str] = []
        self.doc_dirs: list[dict] = []


def is_extraction(messages: list) -> bool:
    first = messages[0]
    return (isinstance(first, dict) and first.get("role") == "system"
            and EXTRACT_MARKER in content_text(first.get("content")))


def doc_id_of(doc: str) -> str:
    line = doc.split("\n", 1)[0]
    _, sep, rest = line.partition(": ")
    if sep:
        line = rest
    return _DIRECTIVE_RE.sub("", line).strip()


def _schema_of(rf) -> dict | None:
    if not isinstance(rf, dict):
        return None
    schema = None
    js = rf.get("json_schema")
    if isinstance(js, dict) and isinstance(js.get("schema"), dict):
        schema = js["schema"]
    elif isinstance(rf.get("schema"), dict):
        schema = rf["schema"]
    return schema


def _keys_from_prompt(system: str) -> list[str]:
    # the last "the keys " (field descriptions earlier in the prompt might say it too)
    i = system.rfind("the keys ")
    if i < 0:
        return []
    seg = system[i + len("the keys "):]
    j = seg.find(". ")
    if j >= 0:
        seg = seg[:j]
    keys = []
    for m in _JSON_STR_RE.finditer(seg):
        try:
            k = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(k, str) and k != "id":
            keys.append(k)
    return keys


def parse_extraction(req: dict, texts: list[str]) -> "Extraction | str":
    """The Extraction a request asks for, or an error message (str)."""
    ex = Extraction()
    user = texts[-1]
    if user.startswith("Document:\n"):
        doc = user[len("Document:\n"):]
        cut = doc.find(_RETRY_CUT)
        if cut >= 0:
            doc = doc[:cut]
        ex.docs = [doc]
    else:
        m = _BATCH_HEAD_RE.match(user)
        if not m:
            return ("fakeserver: extraction prompt's user message starts neither with "
                    "'Document:\\n' nor with '<k> documents:'")
        k = int(m.group(1))
        parts = _BATCH_SPLIT_RE.split(user[m.end():])
        # parts = [before-first, num1, doc1, num2, doc2, ...]
        nums = [int(n) for n in parts[1::2]]
        if parts[0].strip() or nums != list(range(1, k + 1)):
            return ("fakeserver: malformed batch prompt: header says %d documents, found "
                    "blocks numbered %s" % (k, nums))
        ex.batch = True
        ex.docs = parts[2::2]
    ex.doc_ids = [doc_id_of(d) for d in ex.docs]
    ex.doc_dirs = [parse_directives(d) if "[[" in d else {} for d in ex.docs]

    schema = _schema_of(req.get("response_format"))
    row = None
    if schema is not None:
        defs = schema.get("$defs")
        ex.defs = defs if isinstance(defs, dict) else {}
        row = schema
        if ex.batch:
            res = schema.get("properties", {})
            res = res.get("results") if isinstance(res, dict) else None
            if isinstance(res, dict):
                res = _resolve(res, ex.defs)
                items = res.get("items")
                if isinstance(items, dict):
                    row = _resolve(items, ex.defs)
        row = _resolve(row, ex.defs)
        props = row.get("properties")
        if not isinstance(props, dict):
            row = None
    if row is not None:
        ex.row_schema = row
        ex.keys = [k for k in row["properties"] if k != "id"]
    else:
        ex.keys = _keys_from_prompt(texts[0])
    return ex


def _resolve(s, defs: dict, depth: int = 0):
    """Follow "$ref": "#/$defs/X" (a few levels); non-dicts become {}."""
    while isinstance(s, dict) and isinstance(s.get("$ref"), str) and depth < 32:
        ref = s["$ref"]
        name = ref.rsplit("/", 1)[-1] if ref.startswith("#/") else None
        target = defs.get(name) if name is not None else None
        if not isinstance(target, dict):
            break
        s = target
        depth += 1
    return s if isinstance(s, dict) else {}


def _value(key: str, s, doc_id: str, defs: dict, depth: int = 0):
    """(value, kind) of one property for doc_id; kind in string/integer/number/
    boolean/enum/array/object/null/const."""
    s = _resolve(s, defs)
    if depth > 16:
        return "%s:%s" % (key, doc_id), "string"
    if "enum" in s and isinstance(s["enum"], list) and s["enum"]:
        e = s["enum"]
        return e[len(doc_id) % len(e)], "enum"
    if "const" in s:
        return s["const"], "const"
    for comb in ("anyOf", "oneOf", "allOf"):
        alts = s.get(comb)
        if isinstance(alts, list) and alts:
            for alt in alts:
                r = _resolve(alt, defs)
                if r.get("type") != "null":
                    return _value(key, r, doc_id, defs, depth + 1)
            return None, "null"
    t = s.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        t = non_null[0] if non_null else "null"
    if t == "integer":
        return len(doc_id), "integer"
    if t == "number":
        return len(doc_id) / 2, "number"
    if t == "boolean":
        return len(doc_id) % 2 == 0, "boolean"
    if t == "null":
        return None, "null"
    if t == "array":
        item = _resolve(s.get("items"), defs)
        out = []
        for word in doc_id.split():
            v, kind = _value(key, item, word, defs, depth + 1)
            out.append(word if kind == "string" else v)
        return out, "array"
    if t == "object" and isinstance(s.get("properties"), dict):
        return {k: _value(k, p, doc_id, defs, depth + 1)[0]
                for k, p in s["properties"].items()}, "object"
    return "%s:%s" % (key, doc_id), "string"


def make_row(ex: Extraction, i: int, invalid: bool) -> dict:
    doc_id = ex.doc_ids[i]
    null = "null" in ex.doc_dirs[i]
    props = ex.row_schema["properties"] if ex.row_schema is not None else {}
    row = {}
    for key in ex.keys:
        if null:
            row[key] = None
        elif key.endswith("_quote"):
            row[key] = doc_id
        else:
            v, kind = _value(key, props.get(key, {"type": "string"}), doc_id, ex.defs)
            row[key] = "bogus" if invalid and kind in _INVALID_KINDS else v
    return row


def build_extraction(st: "State", ex: Extraction) -> str | None:
    """The answer's content, or None for a context-overflow error (HTTP 400)."""
    dirs = ex.doc_dirs
    any_dir = lambda name: any(name in d for d in dirs)  # noqa: E731
    if ex.batch:
        if len(ex.docs) > 1 and any_dir("overflow"):
            return None
        if any_dir("batch_badjson"):
            return '{"results": ['
    included = list(range(len(ex.docs)))
    if ex.batch and any_dir("batch_short") and included:
        included.pop()
    rows = []
    for i in included:
        n = st.extract_seen.get(ex.doc_ids[i], 0) + 1
        st.extract_seen[ex.doc_ids[i]] = n
        invalid = "invalid_always" in dirs[i] or ("invalid_once" in dirs[i] and n == 1)
        row = make_row(ex, i, invalid)
        if ex.batch:
            row = {"id": i + 1, **row}
        rows.append(row)
    if not ex.batch:
        text = _dumps(rows[0])
        if "fence" in dirs[0]:
            return "Here you go:\n```json\n%s\n```\nThanks" % text
        if "prose" in dirs[0]:
            return "Sure! The answer is %s hope it helps" % text
        return text
    if any_dir("batch_long") and rows:
        rows.append({**rows[-1], "id": len(ex.docs) + 1})
    if any_dir("batch_reorder"):
        rows.reverse()
    if any_dir("batch_bad_ids"):
        rows = [{**r, "id": 1} for r in rows]
    text = _dumps({"results": rows})
    if any_dir("batch_fence"):
        return "Here you go:\n```json\n%s\n```\nThanks" % text
    if any_dir("prose"):
        return "Sure! The answer is %s hope it helps" % text
    return text


# ----------------------------------------------------------------- native dialects
ANTHROPIC_VERSION = "2023-06-01"
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error",
                     413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                     529: "overloaded_error"}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}
GEMINI_BAD_KEY = _dumps({"error": {
    "code": 400, "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT", "details": [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
        "domain": "googleapis.com"}]}}).encode()


def native_error(dialect: str, status: int, message: str, retry_delay=None) -> bytes:
    """An error body in the API's shape; Gemini's says when to retry in a RetryInfo detail
    (retry_delay seconds), as Google's APIs do instead of a Retry-After header."""
    if dialect == "anthropic":
        return _dumps({"type": "error", "error": {
            "type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}).encode()
    error = {"code": status, "message": message,
             "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}
    if retry_delay is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": ("%.3f" % retry_delay).rstrip("0").rstrip(".")
                             + "s"}]
    return _dumps({"error": error}).encode()


def _retry_seconds(extra):
    """The retry delay OpenAI's hint headers in `extra` say, in seconds, or None."""
    for name, value in extra or []:
        try:
            if name.lower() == "retry-after-ms":
                return float(value) / 1000.0
            if name.lower() == "retry-after":
                return float(value)
        except ValueError:
            return None
    return None


def _native_text(content, where: str) -> str:
    """The text of an Anthropic content (string or blocks) or a Gemini parts list."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("%s: must be a string or a list" % where)
    texts = []
    for block in content:
        if not isinstance(block, dict):
            raise ValueError("%s: each element must be an object" % where)
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
    return " ".join(texts)


def _from_gemini_schema(s):
    """Gemini's responseSchema back into the JSON Schema words _value() reads."""
    if not isinstance(s, dict):
        return {}
    out = {}
    for k, v in s.items():
        if k == "type" and isinstance(v, str):
            out["type"] = v.lower()
        elif k == "properties" and isinstance(v, dict):
            out["properties"] = {n: _from_gemini_schema(p) for n, p in v.items()}
        elif k == "items":
            out["items"] = _from_gemini_schema(v)
        elif k == "anyOf" and isinstance(v, list):
            out["anyOf"] = [_from_gemini_schema(x) for x in v]
        elif k != "nullable":
            out[k] = v
    if s.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def native_request(dialect: str, headers: dict, req, target: str):
    """(the request as OpenAI's chat-completions body, None) or (None, error message):
    what each API requires, checked as it does."""
    if not isinstance(req, dict):
        return None, "the request body must be a JSON object"
    if dialect == "anthropic":
        if headers.get("anthropic-version") != ANTHROPIC_VERSION:
            return None, "anthropic-version: header is required (%s)" % ANTHROPIC_VERSION
        if not isinstance(req.get("model"), str):
            return None, "model: Field required"
        mt = req.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            return None, "max_tokens: Field required"
        if "messages" not in req or not isinstance(req["messages"], list) or \
                not req["messages"]:
            return None, "messages: Field required"
        system = req.get("system")
        messages = []
        if system is not None:
            try:
                messages.append({"role": "system",
                                 "content": _native_text(system, "system")})
            except ValueError as e:
                return None, str(e)
        for j, m in enumerate(req["messages"]):
            if not isinstance(m, dict):
                return None, "messages.%d: must be an object" % j
            if m.get("role") == "system":
                return None, ('messages.%d: Unexpected role "system". The Messages API '
                              'accepts a top-level `system` parameter, not "system" as an '
                              'input message role.' % j)
            if m.get("role") not in ("user", "assistant"):
                return None, "messages.%d.role: Input should be 'user' or 'assistant'" % j
            try:
                messages.append({"role": m["role"],
                                 "content": _native_text(m.get("content"),
                                                         "messages.%d.content" % j)})
            except ValueError as e:
                return None, str(e)
        out = {"model": req["model"], "messages": messages, "max_tokens": mt}
        tools, choice = req.get("tools"), req.get("tool_choice")
        if tools is not None:
            if not isinstance(tools, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and
                    isinstance(t.get("input_schema"), dict) for t in tools):
                return None, "tools: each tool needs a name and an input_schema object"
            if isinstance(choice, dict) and choice.get("type") == "tool":
                forced = [t for t in tools if t["name"] == choice.get("name")]
                if not forced:
                    return None, "tool_choice: no tool named %r" % choice.get("name")
                if forced[0]["input_schema"].get("type") != "object":
                    return None, "tools.0.input_schema.type: Input should be 'object'"
                out["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": choice["name"], "schema": forced[0]["input_schema"]}}
                out["_forced_tool"] = choice["name"]
        for k in ("stream", "temperature", "stop_sequences"):
            if k in req:
                out[k] = req[k]
        t = req.get("temperature")
        if t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1):
            return None, "temperature: Input should be less than or equal to 1"
        return out, None
    # gemini
    m = re.search(r"/models/([^/:]+):generateContent$", target.split("?", 1)[0])
    if not m:
        return None, "unknown method"
    contents = req.get("contents")
    if "messages" in req:
        return None, 'Invalid JSON payload received. Unknown name "messages": Cannot find field.'
    if not isinstance(contents, list) or not contents:
        return None, "* GenerateContentRequest.contents: contents is not specified"
    messages = []
    si = req.get("systemInstruction")
    if si is not None:
        if not isinstance(si, dict) or not isinstance(si.get("parts"), list):
            return None, "systemInstruction: parts is required"
        try:
            messages.append({"role": "system",
                             "content": _native_text(si["parts"], "systemInstruction")})
        except ValueError as e:
            return None, str(e)
    for j, c in enumerate(contents):
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list) or not c["parts"]:
            return None, "* GenerateContentRequest.contents[%d].parts: contents.parts must " \
                         "not be empty." % j
        role = c.get("role", "user")
        if role not in ("user", "model"):
            return None, "Please use a valid role: user, model."
        try:
            messages.append({"role": "assistant" if role == "model" else "user",
                             "content": _native_text(c["parts"], "contents[%d]" % j)})
        except ValueError as e:
            return None, str(e)
    out = {"model": m.group(1), "messages": messages}
    gc = req.get("generationConfig")
    if gc is not None:
        if not isinstance(gc, dict):
            return None, "generationConfig must be an object"
        bad = [k for k in gc if k in ("max_tokens", "response_format", "additionalProperties")]
        if bad:
            return None, 'Invalid JSON payload received. Unknown name "%s"' % bad[0]
        schema = gc.get("responseSchema")
        if schema is not None:
            if gc.get("responseMimeType") != "application/json":
                return None, "responseSchema needs responseMimeType application/json"
            if "additionalProperties" in json.dumps(schema) or "$ref" in json.dumps(schema):
                return None, ('Invalid JSON payload received. Unknown name '
                              '"additionalProperties" at \'generation_config.response_schema\'')
            out["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": _from_gemini_schema(schema)}}
        if "maxOutputTokens" in gc:
            out["max_tokens"] = gc["maxOutputTokens"]
    return out, None


def native_answer(dialect: str, req: dict, d: dict, model, content: str, p: int, c: int,
                  counter: int) -> bytes:
    """A successful answer in the API's own shape."""
    pieces = [content]
    if "parts" in d and len(content) > 1:
        half = len(content) // 2
        pieces = [content[:half], content[half:]]
    if dialect == "anthropic":
        blocks = []
        stop = "end_turn"
        if "parts" in d:
            blocks.append({"type": "thinking", "thinking": "hmm", "signature": "sig"})
        value = None
        if req.get("_forced_tool"):
            try:
                value = json.loads(content)
            except ValueError:
                value = None
        if isinstance(value, dict):
            blocks.append({"type": "tool_use", "id": "toolu_%d" % counter,
                           "name": req["_forced_tool"], "input": value})
            stop = "tool_use"
        else:
            blocks.extend({"type": "text", "text": t} for t in pieces)
        if "blocked" in d:
            blocks, stop = [], "refusal"
        usage = {"input_tokens": p, "output_tokens": c}
        if "cache_tokens" in d:
            usage = {"input_tokens": 1, "cache_creation_input_tokens": p - 1,
                     "cache_read_input_tokens": 0, "output_tokens": c}
        return _dumps({"id": "msg_%d" % counter, "type": "message", "role": "assistant",
                       "model": model, "content": blocks, "stop_reason": stop,
                       "stop_sequence": None, "usage": usage}).encode()
    usage = {"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c}
    if "prompt_blocked" in d:
        return _dumps({"promptFeedback": {"blockReason": d["prompt_blocked"][0] or "SAFETY"},
                       "usageMetadata": {"promptTokenCount": p, "totalTokenCount": p}}).encode()
    parts = [{"text": t} for t in pieces]
    if "parts" in d:
        parts.insert(0, {"text": "thinking...", "thought": True})
        usage["thoughtsTokenCount"] = 2
        usage["totalTokenCount"] += 2
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                 "index": 0}
    if "blocked" in d:
        candidate = {"finishReason": d["blocked"][0] or "SAFETY", "index": 0,
                     "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                        "probability": "HIGH", "blocked": True}]}
    return _dumps({"candidates": [candidate], "usageMetadata": usage,
                   "modelVersion": model, "responseId": "resp-%d" % counter}).encode()


def _rfc3339_in(seconds: float) -> str:
    t = time.time() + seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + (".%03dZ" % int(t % 1 * 1000))


def native_headers(dialect: str, extra) -> list:
    """OpenAI's hint headers in the API's own words (Gemini sends none)."""
    out = []
    for name, value in extra or []:
        low = name.lower()
        if not (low.startswith("x-ratelimit-") or low in ("retry-after", "retry-after-ms")):
            out.append((name, value))
            continue
        if dialect != "anthropic":
            continue
        if low == "retry-after-ms":
            out.append(("retry-after", str(max(1, math.ceil(float(value) / 1000.0)))))
        elif low == "retry-after":
            out.append((name, value))
        elif low.startswith("x-ratelimit-reset-"):
            secs = _duration(value)
            if secs is not None:
                out.append(("anthropic-ratelimit-%s-reset" % low.rsplit("-", 1)[1],
                            _rfc3339_in(secs)))
        else:  # x-ratelimit-remaining-requests and the like
            kind, budget = low.split("-")[2], low.rsplit("-", 1)[1]
            out.append(("anthropic-ratelimit-%s-%s" % (budget, kind), value))
    return out


def _duration(text: str):
    total, any_ = 0.0, False
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)?", text):
        any_ = True
        total += float(number) * {"ms": 0.001, "h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total if any_ else None


async def handle_chat(conn: Conn, headers: dict, body: bytes, keep_alive: bool,
                      target: str = "", dialect: str = "") -> bool:
    """Serve one chat request. Return True if the connection may be reused."""
    st = STATE
    t_start = _monotonic()
    auth = headers.get("authorization")
    rec = {"t_start": t_start, "t_end": None, "key": None, "attempt": 0,
           "outcome": None, "auth": auth is not None, "ndocs": 0, "doc_ids": [],
           "model": None, "dialect": dialect or "openai"}
    st.log.append(rec)
    st.requests += 1

    def finish(outcome) -> None:
        rec["t_end"] = _monotonic()
        rec["outcome"] = outcome
        if outcome == "client_closed":
            st.client_closed += 1

    raw_headers: list[tuple[str, str]] = []   # [[hdrb64=...]], once directives are read

    async def reply(status: int, rbody: bytes, extra=None,
                    ctype: str = "application/json") -> bool:
        finish(status)
        if dialect:
            delay = _retry_seconds(extra)
            extra = native_headers(dialect, extra)
            if status >= 400 and rbody.startswith(b'{"error":{"message"'):
                rbody = native_error(dialect, status, json.loads(rbody)["error"]["message"],
                                     delay if status in (429, 503) else None)
        if raw_headers:
            extra = list(extra or []) + raw_headers
        await conn.send(build_response(status, rbody, keep_alive, ctype, extra=extra))
        return keep_alive

    # Azure OpenAI sends the key as "api-key" instead of a bearer token
    azure_key = headers.get("api-key")
    rec["path"] = target
    rec["auth_header"] = ("authorization" if auth is not None else
                          "api-key" if azure_key is not None else None)
    authorized = st.expected_auth is None or auth == st.expected_auth or (
        azure_key is not None and azure_key == st.api_key)
    if dialect:
        name = "x-api-key" if dialect == "anthropic" else "x-goog-api-key"
        native_key = headers.get(name)
        rec["auth_header"] = name if native_key is not None else None
        rec["auth"] = native_key is not None
        rec["headers_seen"] = {k: v for k, v in headers.items()
                               if k in ("anthropic-version", "content-type", "accept")}
        authorized = st.api_key is None or native_key == st.api_key
        auth_fail = (401, native_error("anthropic", 401, "invalid x-api-key")) \
            if dialect == "anthropic" else (400, GEMINI_BAD_KEY)
    # parse body (unauthorized requests get 401 even if the body is bad)
    try:
        req = json.loads(body)
        if not isinstance(req, dict):
            raise ValueError("body is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        if not authorized:
            return await reply(*auth_fail) if dialect else await reply(401, AUTH_BODY)
        return await reply(400, error_body(
            400, "We could not parse the JSON body of your request. (%s)" % e.__class__.__name__))
    if dialect:
        rec["native"] = req
        if not authorized:
            return await reply(*auth_fail)
        req, problem = native_request(dialect, headers, req, target)
        if problem is not None:
            return await reply(400, native_error(dialect, 400, problem))
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        if not authorized:
            return await reply(401, AUTH_BODY)
        return await reply(400, error_body(400, "'messages' is a required property"))
    texts = [content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
    key = texts[-1]
    attempt = st.attempts.get(key, 0) + 1
    st.attempts[key] = attempt
    rec["key"] = key
    rec["attempt"] = attempt
    rec["model"] = req.get("model")
    ex = None
    if is_extraction(messages):
        ex = parse_extraction(req, texts)
        if isinstance(ex, Extraction):
            rec["ndocs"] = len(ex.docs)
            rec["doc_ids"] = list(ex.doc_ids)

    if not authorized:
        return await reply(401, AUTH_BODY)

    wait = st.take_token()
    if wait > 0:
        ms = max(1, math.ceil(wait * 1000))
        return await reply(429, error_body(429), [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "%dms" % ms),
            ("retry-after-ms", str(ms))])

    d = parse_directives(key) if "[[" in key else {}
    if d.get("hdrb64", (None,))[0]:
        import base64
        text = base64.urlsafe_b64decode(d["hdrb64"][0]).decode("latin-1")
        for line in text.split("\n"):
            name, _, value = line.partition(": ")
            raw_headers.append((name, value))

    if d:
        if "quota" in d:
            return await reply(429, QUOTA_BODY, failure_headers(d))

        if applies(d, "stall", attempt):
            if await conn.wait(STALL_SECONDS):
                finish("client_closed")
            else:
                finish("stall")
            return False

    # latency
    delay = None
    if "lat" in d:
        try:
            delay = max(0.0, float(d["lat"][0] or 0)) / 1000.0
        except ValueError:
            delay = None
    if delay is None:
        lo, hi = st.latency
        delay = lo if hi <= lo else random.uniform(lo, hi)
    if delay > 0 and await conn.wait(delay):
        finish("client_closed")
        return False

    if d:
        if applies(d, "drop", attempt):
            finish("drop")
            return False

        if "refuse" in d:
            return await reply(400, REFUSAL_BODY)

        if "maxlen" in d:
            try:
                limit = int(d["maxlen"][0])
            except (TypeError, ValueError):
                limit = 0
            if len(key) > limit:
                return await reply(400, OVERFLOW_BODY)

        if applies(d, "fail", attempt):
            try:
                code = int(d["fail"][0])
            except (TypeError, ValueError):
                code = 500
            return await reply(code, error_body(code), failure_headers(d))

    if isinstance(ex, str):  # extraction prompt the fake cannot read
        return await reply(400, error_body(400, ex))

    model = req.get("model")
    st.chat_counter += 1
    if "big" in d:
        try:
            n = int(d["big"][0])
        except (TypeError, ValueError):
            n = 0
        content = "x" * max(0, n)
    elif "ids" in d:
        prefix = d["ids"][0] or ""
        words = [w for w in re.findall(r"[\w-]+", _DIRECTIVE_RE.sub("", key))
                 if prefix and w.startswith(prefix)]
        content = " ".join(dict.fromkeys(words))
    elif ex is not None and "badjson" not in d:
        content = build_extraction(st, ex)
        if content is None:
            return await reply(400, OVERFLOW_BODY)
    else:
        content = "echo: " + _DIRECTIVE_RE.sub("", key).strip()
    if "rawb64" in d:
        import base64
        rbody = base64.urlsafe_b64decode(d["rawb64"][0] or "")
    elif "badjson" in d:
        rbody = b'{"choices": ['
    elif dialect:
        p = sum(len(t.split()) for t in texts) + 1
        c = len(content.split()) + 1
        rbody = native_answer(dialect, req, d, model, content, p, c, st.chat_counter)
    else:
        p = sum(len(t.split()) for t in texts) + 1
        c = len(content.split()) + 1
        rbody = _dumps({
            "id": "chatcmpl-%d" % st.chat_counter,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }).encode()

    if (req.get("stream") is True or "sse" in d) and "rawb64" not in d and "badjson" not in d:
        texts_words = sum(len(t.split()) for t in texts) + 1
        usage = None
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            c = len(content.split()) + 1
            usage = {"prompt_tokens": texts_words, "completion_tokens": c,
                     "total_tokens": texts_words + c}
        return await stream_chat(conn, rec, finish, d, attempt, keep_alive, model, content,
                                 usage)

    if applies(d, "truncate", attempt):
        finish("truncate")
        data = build_response(200, b"", False, content_length=len(rbody))
        await conn.send(data + rbody[:len(rbody) // 2])
        return False

    if "rawb64" in d and "sse" in d:  # these exact bytes as an event stream
        return await reply(200, rbody, ctype="text/event-stream")
    status = 200
    if "rawb64" in d and d.get("rawstatus", (None,))[0]:
        status = int(d["rawstatus"][0])
    return await reply(status, rbody)


async def stream_chat(conn: Conn, rec: dict, finish, d: dict, attempt: int, keep_alive: bool,
                      model, content: str, usage: dict | None) -> bool:
    """Answer with server-sent events (see the module doc's directives)."""
    st = STATE
    odd = "stream_odd" in d
    eol = "\r\n" if odd else "\n"
    encode = (json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
              if "stream_ascii" in d else _dumps)
    cid = "chatcmpl-%d" % st.chat_counter
    created = int(time.time())

    def chunk(delta: dict, finish_reason=None, choices=True, extra=None) -> dict:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model}
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish_reason}] if choices else []
        if extra:
            obj.update(extra)
        return obj

    def event(obj) -> str:
        data = obj if isinstance(obj, str) else encode(obj)
        if odd and data.startswith("{") and "," in data:
            cut = data.index(",") + 1  # a second data: line; they join with a line break
            return "event: message%sid: %d%sdata: %s%sdata: %s%s%s" % (
                eol, st.chat_counter, eol, data[:cut], eol, data[cut:], eol, eol)
        return "data: %s%s%s" % (data, eol, eol)

    events = [event(chunk({"role": "assistant", "content": ""}))]
    pieces = [content[k:k + 3] for k in range(0, len(content), 3)]
    for k, piece in enumerate(pieces):
        if odd and k % 2:
            events.append(": ping" + eol + eol)
        events.append(event(chunk({"content": piece})))
    half = 1 + len(pieces) // 2
    events.append(event(chunk({}, "stop")))
    if usage is not None:
        events.append(event(chunk({}, choices=False, extra={"usage": usage})))
    if "stream_nodone" not in d:
        events.append(event("[DONE]"))

    head = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n%s\r\n"
            % ("Connection: keep-alive\r\n" if keep_alive else "Connection: close\r\n"))
    await conn.send(head.encode("latin-1"))

    async def send_event(text: str) -> None:
        data = text.encode("utf-8")
        parts = [data[:len(data) // 2], data[len(data) // 2:]] if odd else [data]
        for part in parts:
            if part:
                await conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                if odd:
                    await asyncio.sleep(0.001)

    cut = None
    for name in ("stream_cut", "stream_close", "stream_error", "stream_stall"):
        if applies(d, name, attempt):
            cut = name
            break
    for k, text in enumerate(events):
        if cut is not None and k == half:
            break
        await send_event(text)
    if cut is None:
        await conn.send(b"0\r\n\r\n")
        finish(200)
        return keep_alive
    if cut == "stream_close":
        finish("stream_close")
        return False
    if cut == "stream_stall":
        finish("client_closed" if await conn.wait(STALL_SECONDS) else "stall")
        return False
    if cut == "stream_error":
        err = {"message": "The server had an error while streaming your answer.",
               "type": "server_error", "param": None, "code": None}
        code = d["stream_error"][0]
        if code:
            err["code"] = int(code)
        await send_event(event({"error": err}))
    await conn.send(b"0\r\n\r\n")
    finish(cut)
    return keep_alive
# ----------------------------------------------------------------- embeddings

EMBED_DIM = 16
_WORD_RE = re.compile(r"\w+")


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def embedding_of(text: str, dim: int = EMBED_DIM) -> list:
    """The fake's vector for `text`: each word (directives removed, lower case) adds 1 to a
    dimension picked by its hash (and 0.5 to the next), then unit length, as float32
    values (so their JSON text reads back exactly). Texts sharing words are close."""
    import hashlib

    v = [0.0] * dim
    for word in _WORD_RE.findall(_DIRECTIVE_RE.sub(" ", text).lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        v[h % dim] += 1.0
        v[(h // dim + 1) % dim] += 0.5
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    if not any(v):
        v[0] = 1.0
    return [_f32(x / norm) for x in v]


async def handle_embeddings(conn: Conn, headers: dict, body: bytes, keep_alive: bool) -> bool:
    st = STATE
    auth = headers.get("authorization")
    rec = {"t_start": _monotonic(), "t_end": None, "key": None, "attempt": 0,
           "outcome": None, "auth": auth is not None, "ninputs": 0, "inputs": [],
           "dimensions": None, "encoding_format": None, "embeddings": True}
    st.log.append(rec)
    st.requests += 1

    async def reply(status: int, rbody: bytes, extra=None) -> bool:
        rec["t_end"] = _monotonic()
        rec["outcome"] = status
        await conn.send(build_response(status, rbody, keep_alive, extra=extra))
        return keep_alive

    if st.expected_auth is not None and auth != st.expected_auth:
        return await reply(401, AUTH_BODY)
    try:
        req = json.loads(body)
        if not isinstance(req, dict):
            raise ValueError("body is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return await reply(400, error_body(
            400, "We could not parse the JSON body of your request. (%s)" % e.__class__.__name__))
    inputs = req.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(t, str) and t for t in inputs):
        return await reply(400, error_body(400, "'input' must be a non-empty string or a "
                                                "non-empty array of non-empty strings"))
    if len(inputs) > 2048:
        return await reply(400, error_body(400, "'input' must have at most 2048 items"))
    rec["ninputs"] = len(inputs)
    rec["inputs"] = list(inputs)
    rec["dimensions"] = req.get("dimensions")
    rec["encoding_format"] = req.get("encoding_format")
    key = "\x00".join(inputs)
    attempt = st.attempts.get(key, 0) + 1
    st.attempts[key] = attempt
    rec["key"] = key
    rec["attempt"] = attempt

    wait = st.take_token()
    if wait > 0:
        ms = max(1, math.ceil(wait * 1000))
        return await reply(429, error_body(429), [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "%dms" % ms), ("retry-after-ms", str(ms))])
    d = {}
    for t in inputs:
        if "[[" in t:
            d = parse_directives(t)
            break
    if applies(d, "stall", attempt):
        if await conn.wait(STALL_SECONDS):
            rec["outcome"] = "client_closed"
        return False
    delay = None
    if "lat" in d:
        try:
            delay = max(0.0, float(d["lat"][0] or 0)) / 1000.0
        except ValueError:
            delay = None
    if delay is None:
        lo, hi = st.latency
        delay = lo if hi <= lo else random.uniform(lo, hi)
    if delay > 0 and await conn.wait(delay):
        rec["outcome"] = "client_closed"
        return False
    if applies(d, "drop", attempt):
        rec["outcome"] = "drop"
        return False
    if applies(d, "fail", attempt):
        try:
            code = int(d["fail"][0])
        except (TypeError, ValueError):
            code = 500
        return await reply(code, error_body(code), failure_headers(d))
    if "rawb64" in d:
        import base64
        return await reply(200, base64.urlsafe_b64decode(d["rawb64"][0] or ""))

    dim = EMBED_DIM
    dims = req.get("dimensions")
    if isinstance(dims, int) and dims > 0 and "emb_nodims" not in d:
        dim = dims
    b64 = req.get("encoding_format") == "base64"
    items = []
    tokens = 0
    for i, text in enumerate(inputs):
        tokens += len(text.split()) or 1
        own = parse_directives(text) if "[[" in text else {}
        if "emb_drop" in own:
            continue
        n = dim
        if "emb_len" in own:
            try:
                n = int(own["emb_len"][0])
            except (TypeError, ValueError):
                n = dim
        vec = embedding_of(text, n)
        items.append((i, vec))
        if "emb_dup" in own:
            items.append((i, [-x for x in vec]))
    if "emb_oob" in d:
        items.append((len(inputs), embedding_of("out of range", dim)))
    if "emb_shuffle" in d:
        items.reverse()
    data = []
    for i, vec in items:
        if b64:
            import base64
            value = base64.b64encode(struct.pack("<%df" % len(vec), *vec)).decode()
        else:
            value = vec
        item = {"object": "embedding", "embedding": value}
        if "emb_noindex" not in d:
            item = {"object": "embedding", "index": i, "embedding": value}
        data.append(item)
    rbody = _dumps({"object": "list", "data": data, "model": req.get("model"),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()
    if applies(d, "truncate", attempt):
        rec["outcome"] = "truncate"
        await conn.send(build_response(200, b"", False, content_length=len(rbody))
                        + rbody[:len(rbody) // 2])
        return False
    return await reply(200, rbody)


async def handle_control(conn: Conn, method: str, path: str, body: bytes,
                         keep_alive: bool) -> bool:
    st = STATE
    status, rbody = 200, OK_BODY
    if path == "/_config":
        if method != "POST":
            status, rbody = 405, error_body(405, "Use POST.")
        else:
            try:
                cfg = json.loads(body) if body.strip() else {}
                if not isinstance(cfg, dict):
                    raise ValueError("config must be a JSON object")
                st.configure(cfg)
            except (ValueError, TypeError, IndexError, KeyError) as e:
                status, rbody = 400, error_body(400, "Bad config: %s" % e)
    elif path == "/_reset":
        if method != "POST":
            status, rbody = 405, error_body(405, "Use POST.")
        else:
            st.reset()
    elif path == "/_log":
        rbody = _dumps(st.log).encode()
    elif path == "/_stats":
        rbody = _dumps({"open_connections": st.open_connections,
                        "total_connections": st.total_connections,
                        "requests": st.requests,
                        "client_closed": st.client_closed,
                        "max_in_flight": st.max_in_flight}).encode()
    else:
        status, rbody = 404, error_body(404, "Unknown control endpoint %s" % path)
    await conn.send(build_response(status, rbody, keep_alive))
    return keep_alive


# ----------------------------------------------------------------- connection loop

async def serve_request(conn: Conn, first: bool) -> bool:
    """Read and answer one request. Return True to keep the connection open."""
    head = await conn.read_head()
    if head is None:
        return False
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    try:
        method, target, version = lines[0].decode("latin-1").split(" ", 2)
    except ValueError:
        raise BadRequest(400, "Malformed request line.")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadRequest(400, "Malformed header line.")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")

    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection

    path = target.split("?", 1)[0]
    control = path.startswith("/_")
    if first and control and conn.counted:
        # connections that begin with a control request are not reported in /_stats
        conn.counted = False
        STATE.open_connections -= 1
        STATE.total_connections -= 1

    if headers.get("expect", "").lower() == "100-continue":
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await conn.read_chunked()
    else:
        cl = headers.get("content-length")
        if cl:
            try:
                n = int(cl)
            except ValueError:
                raise BadRequest(400, "Bad Content-Length.")
            if n < 0:
                raise BadRequest(400, "Bad Content-Length.")
            if n > MAX_BODY:
                raise BadRequest(413, "Request body too large.")
            body = await conn.read_exact(n) if n else b""
        else:
            body = b""

    if control:
        return await handle_control(conn, method, path, body, keep_alive)
    dialect = "anthropic" if path.endswith("/v1/messages") else \
        "gemini" if path.endswith(":generateContent") else ""
    if path.endswith("/chat/completions") or dialect:
        if method != "POST":
            await conn.send(build_response(405, error_body(405, "Method not allowed."),
                                           keep_alive))
            return keep_alive
        st = STATE
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            return await handle_chat(conn, headers, body, keep_alive, target, dialect)
        finally:
            st.in_flight -= 1
    if path.endswith("/embeddings"):
        if method != "POST":
            await conn.send(build_response(405, error_body(405, "Method not allowed."),
                                           keep_alive))
            return keep_alive
        return await handle_embeddings(conn, headers, body, keep_alive)
    await conn.send(build_response(404, error_body(404, "Unknown URL %s" % path), keep_alive))
    return keep_alive


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    st = STATE
    task = asyncio.current_task()
    st.tasks.add(task)
    st.open_connections += 1
    st.total_connections += 1
    conn = Conn(reader, writer)
    try:
        first = True
        while await serve_request(conn, first):
            first = False
    except BadRequest as e:
        try:
            await conn.send(build_response(e.status, error_body(e.status, e.message), False))
        except Exception:
            pass
    except (ClientGone, ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    except asyncio.CancelledError:
        pass
    except Exception as e:  # never let one connection kill the server
        print("fakeserver: unexpected error: %r" % (e,), file=sys.stderr, flush=True)
    finally:
        if conn.counted:
            st.open_connections -= 1
        st.tasks.discard(task)
        try:
            writer.close()
        except Exception:
            pass


# ----------------------------------------------------------------- main

async def amain(args) -> None:
    global STATE
    STATE = State(args.api_key)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    if not args.no_stdin_watch:
        def watch_stdin() -> None:
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                return  # no usable stdin: don't treat as EOF
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    tls = None
    if args.tls_cert:
        import ssl

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = await asyncio.start_server(handle_connection, args.host, args.port, ssl=tls,
                                        backlog=4096, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write("PORT %d\n" % port)
    sys.stdout.flush()

    await stop.wait()
    server.close()
    tasks = list(STATE.tasks)
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate")
    ap.add_argument("--tls-key", default=None, help="... and this private key")
    ap.add_argument("--no-stdin-watch", action="store_true",
                    help="do not exit when stdin reaches EOF")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("fakeserver binds to loopback only")
    try:
        asyncio.run(amain(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
