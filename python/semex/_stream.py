"""Streamed answers (``stream=True``) on the Python side.

The engine's workers read event streams in C (csrc/sse.h) and hand back the same result a
whole answer gives; this module has the two things left to Python:

* ``read_event_stream``: the reader for the rare stream the C reader leaves to json.loads
  (a chunk it is not sure to decode exactly), with the same rules as csrc/sse.h;
* ``DeltaPump``: calls the user's ``on_chunk(index, text)`` from the thread that waits (the
  sync wait's tick, or the event loop's reader callback), draining what the workers queued
  in bulk. Workers never call Python.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

ChunkCallback = Callable[[int, Optional[str]], Any]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FIELDS = (b"", b"data", b"event", b"id", b"retry")


class StreamCut(Exception):
    """The stream ended before [DONE] and before any finish_reason."""


class StreamErrorEvent(Exception):
    """The server sent an error inside the stream; ``body`` is that event's data."""

    def __init__(self, body: bytes, status: int):
        super().__init__("the server reported an error inside the event stream "
                         f"(status {status})")
        self.body = body
        self.status = status


def is_event_stream(body: Optional[bytes]) -> bool:
    """Whether an answer's body is an event stream rather than JSON (which never starts with
    ``<field>:``)."""
    if not body:
        return False
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    first = _LINE_BREAK.split(body[:64].decode("latin-1"), 1)[0].encode("latin-1")
    field, colon, _ = first.partition(b":")
    return bool(colon) and field in _FIELDS


def _token_count(value: Any) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        try:
            return int(value)
        except (OverflowError, ValueError):
            return 0
    return 0


def _error_status(data: str) -> int:
    try:
        obj = json.loads(data)
    except ValueError:
        return 500
    err = obj.get("error") if isinstance(obj, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 500


def read_event_stream(body: bytes) -> Tuple[Optional[str], Optional[str], int, int, int]:
    """A streamed answer as (content, finish_reason, prompt, completion, total tokens), read
    under csrc/sse.h's rules. Raises StreamErrorEvent, StreamCut, or ValueError (not a
    readable stream)."""
    text = body.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_BREAK.split(text)
    parts: List[str] = []
    state: Dict[str, Any] = {"seen": False, "finish": None, "usage": None, "done": False,
                             "events": 0, "error": None}

    def on_event(data: str, error_event: bool, tail: bool) -> None:
        if state["done"] or state["error"] is not None:
            return
        if data == "[DONE]":
            state["events"] += 1
            state["done"] = True
            return
        if not data.strip(" \t\r\n"):
            return
        state["events"] += 1
        if error_event:
            state["error"] = data
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            if tail:
                return  # the last event of a body cut inside it
            raise
        if not isinstance(chunk, dict):
            raise ValueError(f"a stream chunk is a {type(chunk).__name__}, not an object")
        if chunk.get("error") is not None:
            state["error"] = data
            return
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                    state["seen"] = True
                elif content is not None:
                    raise ValueError("a stream chunk's delta content is not a string")
                if isinstance(choice.get("finish_reason"), str):
                    state["finish"] = choice["finish_reason"]
        if isinstance(chunk.get("usage"), dict):
            state["usage"] = chunk["usage"]

    data: Optional[List[str]] = None
    error_event = False
    last = len(lines) - 1
    for k, line in enumerate(lines):
        if k == last and not line:
            break  # the body ended with a line break
        if not line:
            if data is not None:
                on_event("\n".join(data), error_event, False)
            data, error_event = None, False
            continue
        if line[0] == ":":
            continue
        field, colon, value = line.partition(":")
        if not colon:
            field, value = line, ""
        elif value.startswith(" "):
            value = value[1:]
        if field == "data":
            if data is None:
                data = []
            data.append(value)
        elif field == "event":
            error_event = value == "error"
    if data is not None:
        on_event("\n".join(data), error_event, True)

    if state["error"] is not None:
        raise StreamErrorEvent(state["error"].encode("utf-8"), _error_status(state["error"]))
    if not state["events"]:
        raise ValueError("the event stream has no events")
    if not state["done"] and state["finish"] is None:
        raise StreamCut("the event stream ended before [DONE]")
    usage = state["usage"] or {}
    return ("".join(parts) if state["seen"] else None, state["finish"],
            _token_count(usage.get("prompt_tokens")),
            _token_count(usage.get("completion_tokens")),
            _token_count(usage.get("total_tokens")))


class DeltaPump:
    """Hands streamed text to ``callback(index, text)`` on the waiting thread.

    For one index the texts come in order and join to its answer; ``text`` None means the
    attempt that streamed the earlier text failed (a retry follows, or the item failed):
    drop what was shown for it. An answer that arrives whole (a server that does not stream,
    or a stream read by ``read_event_stream``) is handed over as its remaining text when its
    window is collected, so the rule holds for every item."""

    __slots__ = ("callback", "delivered")

    def __init__(self, callback: ChunkCallback):
        self.callback = callback
        self.delivered: Dict[int, int] = {}  # characters handed over per unfinished item

    def drain(self, start: int, batch: Any, rows: Optional[List[int]] = None) -> None:
        """`rows`: the item of each slot when the batch holds only some of its window's
        items (the cache answered the others); else slot k is item start + k."""
        deltas = batch.take_deltas()
        if not deltas:
            return
        callback, delivered = self.callback, self.delivered
        for offset, text in deltas:
            i = start + offset if rows is None else rows[offset]
            if text is None:
                delivered.pop(i, None)
            else:
                delivered[i] = delivered.get(i, 0) + len(text)
            callback(i, text)

    def settle(self, i: int, content: Optional[str]) -> None:
        """Item i is final: hand over what of its content was not streamed (or, if it failed
        after streaming some text, say to drop it)."""
        done = self.delivered.pop(i, 0)
        if content is None:
            if done:
                self.callback(i, None)
        elif len(content) > done:
            self.callback(i, content[done:])
