"""What the native dialects (anthropic.py, gemini.py) share: the plan of one call's bodies,
the checks of OpenAI-style request fields, and reading conversations.

A call's fields arrive in OpenAI's vocabulary (``max_tokens``, ``stop``, ``response_format``
and the rest of what LM and llm_batch/sem_extract put in a chat-completions body); a dialect
turns them into its own body once per call (:meth:`Dialect.plan`), so everything above the
provider layer stays the same on each provider.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from .. import errors as E

_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


@dataclass
class Plan:
    """How one call's bodies are written. Every body is ``prefix`` + a per-row part (so the
    cache keys a body by what follows the prefix); a plain prompt's body is ``user_open`` +
    its JSON string + ``user_close``; a conversation's is ``conversation(i, messages)``."""

    fields: Dict[str, Any]           # the native fields every body shares (the cache key)
    prefix: str
    user_open: str
    user_close: str
    conversation: Callable[[int, Sequence[Mapping[str, Any]]], str]


class Dialect:
    """A native provider API: how its requests are written and its answers read. The
    engine's reader of the same answers is ``engine_dialect`` (csrc/nativejson.h)."""

    name = ""
    engine_dialect = 0
    # finish reasons that mean the provider withheld the answer: the row fails with
    # ContentBlockedError
    blocked: FrozenSet[str] = frozenset()

    def url(self, base: str, model: str) -> str:
        raise NotImplementedError

    def auth_header(self, key: str) -> str:
        raise NotImplementedError

    def headers(self) -> List[str]:
        return []

    def plan(self, fields: Dict[str, Any], system_prompt: Optional[str], where: str) -> Plan:
        raise NotImplementedError

    def read(self, answer: Any) -> tuple:
        """(content, finish_reason, prompt, completion, total tokens) of a parsed answer;
        raises KeyError/IndexError/TypeError/ValueError when it cannot be read."""
        raise NotImplementedError


def refuse(fields: Dict[str, Any], names: Mapping[str, str], provider: str) -> None:
    """OpenAI-only request fields a provider would refuse on every row: an error now."""
    for name, why in names.items():
        if name in fields and fields[name] is not None:
            raise E.ConfigurationError(f"{name}=... is not supported by provider={provider!r}"
                                       f" ({why})")


def pop_max_tokens(fields: Dict[str, Any]) -> Optional[int]:
    value = fields.pop("max_completion_tokens", None)
    given = fields.pop("max_tokens", None)
    value = value if value is not None else given
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise E.ConfigurationError(f"max_tokens must be an integer >= 1, got {value!r}")
    return value


def stop_list(value: Any) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise E.ConfigurationError(f"stop must be a string or a list of strings, got {value!r}")


def schema_of(response_format: Any) -> Tuple[Optional[Dict[str, Any]], str]:
    """(JSON schema or None, a name) asked for by an OpenAI-style response_format; (None,
    "") when it asks for text. json_object without a schema: any JSON object."""
    if response_format is None:
        return None, ""
    if not isinstance(response_format, Mapping):
        raise E.ConfigurationError("response_format must be a dict like OpenAI's, got "
                                   f"{type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None, ""
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise E.ConfigurationError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                "{...}}}")
        return dict(spec["schema"]), str(spec.get("name") or "answer")
    if kind == "json_object":
        schema = response_format.get("schema")
        return (dict(schema) if isinstance(schema, Mapping) else {"type": "object"}), "answer"
    raise E.ConfigurationError(f"response_format type must be 'json_schema', 'json_object' "
                               f"or 'text', got {kind!r}")


_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)\Z", re.S)


def image_of(part: Mapping[str, Any], where: str) -> Tuple[str, str, str]:
    """("base64", media type, data) or ("url", "", url) of an OpenAI image_url part."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise E.ConfigurationError(f"{where}: image_url needs a 'url' string")
    match = _DATA_URL.match(url)
    if match:
        return "base64", match.group(1), match.group(2)
    return "url", "", url


def split_system(messages: Sequence[Mapping[str, Any]], where: str,
                 system_prompt: Optional[str]) -> Tuple[Optional[str], List[Mapping[str, Any]]]:
    """(the system text: system_prompt and every system message's, joined by blank lines;
    the other messages). Native APIs take the system prompt apart from the turns."""
    texts = [system_prompt] if system_prompt else []
    turns = []
    for j, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            texts.append(text_of(message.get("content"), f"{where}[{j}]"))
        elif role in ("user", "assistant"):
            turns.append(message)
        else:
            raise E.ConfigurationError(
                f"{where}[{j}]: role {role!r} is not supported here (system, user and "
                "assistant are)")
    if not turns:
        raise E.ConfigurationError(f"{where} has no user or assistant message")
    return ("\n\n".join(t for t in texts if t) or None), turns


def text_of(content: Any, where: str) -> str:
    """A system message's text (a string, or text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise E.ConfigurationError(f"{where}: a system message holds text only")
            texts.append(part["text"])
        return "\n".join(texts)
    raise E.ConfigurationError(f"{where}: content must be a string or a list of parts, got "
                               f"{type(content).__name__}")


def check_temperature(value: Any, top: float, provider: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value <= top:
        raise E.ConfigurationError(
            f"temperature must be a number from 0 to {top:g} for provider={provider!r}, "
            f"got {value!r}")


def token_count(value: Any) -> int:
    """A usage count as a provider sent it; anything but a non-negative number counts 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        try:
            return int(value)
        except (OverflowError, ValueError):  # inf
            return 0
    return 0


def encode(value: Any, where: str) -> str:
    try:
        return _ENCODE(value)
    except (TypeError, ValueError) as exc:
        raise E.ConfigurationError(f"{where} is not JSON-serializable: {exc}") from None


def open_prefix(native: Dict[str, Any]) -> str:
    """'{' + the shared fields + ', ' (the per-row members follow)."""
    encoded = encode(native, "request fields")
    return "{" + encoded[1:-1] + ", " if native else "{"
