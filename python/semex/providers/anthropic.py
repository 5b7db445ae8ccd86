"""Anthropic's Messages API: ``POST {api_base}/v1/messages``.

The key goes in ``x-api-key`` with ``anthropic-version: 2023-06-01``; the system prompt is the
top-level ``system`` field (never a message); ``max_tokens`` is required, so it is always
sent (DEFAULT_MAX_TOKENS unless given). Structured output (sem_extract's response_format)
is a forced tool: ``tools=[{name, input_schema}]`` and ``tool_choice={"type": "tool",
"name": ...}``; the answer is that tool_use block's ``input`` (as JSON text), else the text
blocks joined. The engine reads answers in C (csrc/nativejson.c); :meth:`read` is the same
reader for the bodies it leaves to Python.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import errors as E
from . import _native as N

API_VERSION = "2023-06-01"
DEFAULT_BASE = "https://api.anthropic.com"
# Sent when neither LM(max_tokens=...) nor the call gives one (the API requires it): room
# for any extraction answer, below every current model's output limit.
DEFAULT_MAX_TOKENS = 4096

_OPENAI_ONLY = {
    "logprobs": "Anthropic returns no log-probabilities",
    "top_logprobs": "Anthropic returns no log-probabilities",
    "logit_bias": "Anthropic has no logit bias",
    "presence_penalty": "Anthropic has no presence penalty",
    "frequency_penalty": "Anthropic has no frequency penalty",
    "seed": "Anthropic has no seed",
    "stream_options": "streaming is not supported with this provider yet",
}
_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")


class Anthropic(N.Dialect):
    name = "anthropic"
    blocked = frozenset({"refusal"})

    def __init__(self) -> None:
        from .. import _engine

        self.engine_dialect = _engine.DIALECT_ANTHROPIC

    def url(self, base: str, model: str) -> str:
        return base + ("/messages" if base.endswith("/v1") else "/v1/messages")

    def auth_header(self, key: str) -> str:
        return f"x-api-key: {key}"

    def headers(self) -> List[str]:
        return [f"anthropic-version: {API_VERSION}"]

    def plan(self, fields: Dict[str, Any], system_prompt: Optional[str], where: str
             ) -> N.Plan:
        f = dict(fields)
        N.refuse(f, _OPENAI_ONLY, self.name)
        if f.pop("n", 1) not in (1, None):
            raise E.ConfigurationError("n > 1 is not supported by provider='anthropic'")
        native: Dict[str, Any] = {"model": f.pop("model")}
        max_tokens = N.pop_max_tokens(f)
        native["max_tokens"] = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
        temperature = f.pop("temperature", None)
        N.check_temperature(temperature, 1.0, self.name)
        if temperature is not None:
            native["temperature"] = temperature
        stop = N.stop_list(f.pop("stop", None))
        if stop:
            native["stop_sequences"] = stop
        schema, name = N.schema_of(f.pop("response_format", None))
        if schema is not None:
            if schema.get("type") != "object":
                raise E.ConfigurationError(
                    "provider='anthropic' answers structured output through a tool, whose "
                    "input_schema must be an object schema ({'type': 'object', ...})")
            name = _TOOL_NAME.sub("_", name)[:64] or "answer"
            native["tools"] = [{"name": name, "description": "Record the answer.",
                                "input_schema": schema}]
            native["tool_choice"] = {"type": "tool", "name": name}
        # The call's system prompt as blocks: a `system` field given as Anthropic's text
        # blocks (with cache_control, to cache a long shared preamble) comes first.
        base = _system_blocks(f.pop("system", None), "system")
        if system_prompt:
            base.append({"type": "text", "text": system_prompt})
        native.update(f)  # Anthropic's own fields (top_k, metadata, thinking...) as given
        prefix = N.open_prefix(native)

        def open_for(blocks: List[Dict[str, Any]]) -> str:
            system = _system_value(blocks)
            return prefix + (f'"system": {N.encode(system, "system_prompt")}, '
                             if system else "")

        user_open = open_for(base) + '"messages": [{"role": "user", "content": '

        def conversation(i: int, messages: Sequence[Mapping[str, Any]]) -> str:
            at = f"{where}[{i}]"
            blocks = list(base)
            turns = []
            for j, m in enumerate(messages):
                role = m.get("role")
                if role in ("system", "developer"):
                    blocks += _system_blocks(m.get("content"), f"{at}[{j}]")
                elif role in ("user", "assistant"):
                    turns.append(m)
                else:
                    raise E.ConfigurationError(
                        f"{at}[{j}]: role {role!r} is not supported here (system, user and "
                        "assistant are)")
            if not turns:
                raise E.ConfigurationError(f"{at} has no user or assistant message")
            wire = [{"role": m["role"], "content": _content(m.get("content"), f"{at}[{j}]")}
                    for j, m in enumerate(turns)]
            return open_for(blocks) + '"messages": ' + N.encode(wire, at) + "}"

        return N.Plan(native, prefix, user_open, "}]}", conversation)

    def read(self, answer: Any) -> tuple:
        blocks = answer["content"]
        if not isinstance(blocks, list):
            raise TypeError("content is not a list of blocks")
        tool = None
        texts = []
        for block in blocks:
            if not isinstance(block, dict):
                raise TypeError("a content block is not an object")
            kind = block.get("type")
            if kind == "text":
                text = block["text"]
                if not isinstance(text, str):
                    raise TypeError("a text block's text is not a string")
                texts.append(text)
            elif kind == "tool_use" and tool is None and "input" in block:
                tool = json.dumps(block["input"], ensure_ascii=False)
        content = tool if tool is not None else ("".join(texts) if texts else None)
        finish = answer.get("stop_reason")
        if finish is not None and not isinstance(finish, str):
            raise TypeError("stop_reason is not a string")
        usage = answer.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        prompt = sum(N.token_count(usage.get(k)) for k in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        completion = N.token_count(usage.get("output_tokens"))
        return content, finish, prompt, completion, prompt + completion


def _system_blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    """A system text (a string, or text blocks, which may carry cache_control) as blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, (list, tuple)):
        blocks = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise E.ConfigurationError(f"{where}: a system message holds text blocks "
                                           "only ({'type': 'text', 'text': ...})")
            blocks.append(dict(part))
        return blocks
    raise E.ConfigurationError(f"{where}: a system prompt must be a string or a list of text "
                               f"blocks, got {type(content).__name__}")


def _system_value(blocks: List[Dict[str, Any]]) -> Any:
    """The `system` field: one string when the blocks are plain text (joined by blank
    lines), else the blocks as they are (cache_control kept)."""
    if all(set(b) <= {"type", "text"} for b in blocks):
        return "\n\n".join(b["text"] for b in blocks if b["text"]) or None
    return blocks


def _content(content: Any, where: str) -> Any:
    """A message's content in Anthropic's shape: a string as it is; OpenAI parts as text and
    image blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise E.ConfigurationError(f"{where}: content must be a string or a list of parts, "
                                   f"got {type(content).__name__}")
    blocks = []
    for part in content:
        if not isinstance(part, Mapping):
            raise E.ConfigurationError(f"{where}: a content part must be a dict")
        kind = part.get("type")
        if kind == "image_url":
            how, media, data = N.image_of(part, where)
            source = ({"type": "base64", "media_type": media, "data": data} if how == "base64"
                      else {"type": "url", "url": data})
            blocks.append({"type": "image", "source": source})
        else:  # text, and Anthropic's own blocks (image, document...) as given
            blocks.append(dict(part))
    return blocks
