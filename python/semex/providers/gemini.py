"""Gemini's generateContent: ``POST {api_base}/v1beta/models/{model}:generateContent``.

The key goes in ``x-goog-api-key``; the system prompt in ``systemInstruction``; sampling
options in ``generationConfig`` (temperature, maxOutputTokens, topP, stopSequences...);
structured output as ``responseMimeType="application/json"`` with a ``responseSchema``,
which is an OpenAPI 3.0 subset, not JSON Schema: :func:`response_schema` converts
(references inlined, ``["string", "null"]`` as ``nullable``, no ``additionalProperties``,
upper-case type names, property order kept with ``propertyOrdering``). The answer is
``candidates[0].content.parts[*].text`` joined; a candidate withheld by the provider
(finishReason SAFETY, RECITATION, ...) or a prompt blocked outright (promptFeedback) is that
row's ContentBlockedError. The engine reads answers in C (csrc/nativejson.c).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence
from urllib.parse import quote

from .. import errors as E
from . import _native as N

DEFAULT_BASE = "https://generativelanguage.googleapis.com"

# finishReason / blockReason values that mean the answer was withheld
BLOCKED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                     "IMAGE_SAFETY", "LANGUAGE", "BLOCK_REASON_UNSPECIFIED",
                     "OTHER"})

# OpenAI field -> generationConfig field
_GENERATION = {"top_p": "topP", "top_k": "topK", "seed": "seed",
               "presence_penalty": "presencePenalty",
               "frequency_penalty": "frequencyPenalty"}
_OPENAI_ONLY = {
    "logit_bias": "Gemini has no logit bias",
    "logprobs": "not read by semex from Gemini's answers",
    "top_logprobs": "not read by semex from Gemini's answers",
    "stream_options": "streaming is not supported with this provider yet",
}


class Gemini(N.Dialect):
    name = "gemini"
    blocked = BLOCKED

    def __init__(self) -> None:
        from .. import _engine

        self.engine_dialect = _engine.DIALECT_GEMINI

    def url(self, base: str, model: str) -> str:
        model = model[len("models/"):] if model.startswith("models/") else model
        versioned = base.rsplit("/", 1)[-1] in ("v1", "v1beta", "v1alpha")
        return (f"{base}{'' if versioned else '/v1beta'}/models/{quote(model, safe='')}"
                ":generateContent")

    def auth_header(self, key: str) -> str:
        return f"x-goog-api-key: {key}"

    def plan(self, fields: Dict[str, Any], system_prompt: Optional[str], where: str
             ) -> N.Plan:
        f = dict(fields)
        f.pop("model", None)  # in the URL
        N.refuse(f, _OPENAI_ONLY, self.name)
        generation: Dict[str, Any] = {}
        n = f.pop("n", None)
        if n not in (None, 1):
            raise E.ConfigurationError("n > 1 is not supported by provider='gemini' (semex "
                                       "reads the first candidate)")
        temperature = f.pop("temperature", None)
        N.check_temperature(temperature, 2.0, self.name)
        if temperature is not None:
            generation["temperature"] = temperature
        max_tokens = N.pop_max_tokens(f)
        if max_tokens is not None:
            generation["maxOutputTokens"] = max_tokens
        for name, native in _GENERATION.items():
            value = f.pop(name, None)
            if value is not None:
                generation[native] = value
        stop = N.stop_list(f.pop("stop", None))
        if stop:
            generation["stopSequences"] = stop
        schema, _ = N.schema_of(f.pop("response_format", None))
        if schema is not None:
            generation["responseMimeType"] = "application/json"
            if schema != {"type": "object"}:  # json_object without a schema: any JSON
                generation["responseSchema"] = response_schema(schema)
        given = f.pop("generationConfig", None)
        if given is not None:
            if not isinstance(given, Mapping):
                raise E.ConfigurationError("generationConfig must be a dict")
            generation.update(given)  # the caller's own settings win
        native: Dict[str, Any] = dict(f)  # Gemini's own fields (safetySettings...) as given
        if generation:
            native["generationConfig"] = generation
        prefix = N.open_prefix(native)

        def open_for(system: Optional[str]) -> str:
            if not system:
                return prefix
            return (prefix + '"systemInstruction": {"parts": [{"text": '
                    + N.encode(system, "system_prompt") + "}]}, ")

        user_open = open_for(system_prompt) + '"contents": [{"role": "user", "parts": [' \
            '{"text": '

        def conversation(i: int, messages: Sequence[Mapping[str, Any]]) -> str:
            at = f"{where}[{i}]"
            system, turns = N.split_system(messages, at, system_prompt)
            wire = [{"role": "model" if m["role"] == "assistant" else "user",
                     "parts": _parts(m.get("content"), f"{at}[{j}]")}
                    for j, m in enumerate(turns)]
            return open_for(system) + '"contents": ' + N.encode(wire, at) + "}"

        return N.Plan(native, prefix, user_open, "}]}]}", conversation)

    def read(self, answer: Any) -> tuple:
        usage = answer.get("usageMetadata")
        if not isinstance(usage, dict):
            usage = {}
        prompt = N.token_count(usage.get("promptTokenCount"))
        completion = N.token_count(usage.get("candidatesTokenCount")) + \
            N.token_count(usage.get("thoughtsTokenCount"))
        total = N.token_count(usage.get("totalTokenCount"))
        candidates = answer.get("candidates")
        if not candidates:
            feedback = answer.get("promptFeedback")
            reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if isinstance(reason, str):
                return None, reason, prompt, completion, total  # the prompt was blocked
            raise KeyError("candidates")
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise TypeError("candidates[0] is not an object")
        finish = candidate.get("finishReason")
        if finish is not None and not isinstance(finish, str):
            raise TypeError("finishReason is not a string")
        content = candidate.get("content")
        texts = []
        if content is not None:
            parts = content.get("parts", [])
            if not isinstance(parts, list):
                raise TypeError("parts is not a list")
            for part in parts:
                if not isinstance(part, dict):
                    raise TypeError("a part is not an object")
                if "text" in part and part.get("thought") is not True:
                    if not isinstance(part["text"], str):
                        raise TypeError("a part's text is not a string")
                    texts.append(part["text"])
        return ("".join(texts) if texts else None), finish, prompt, completion, total


def _parts(content: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, (list, tuple)):
        raise E.ConfigurationError(f"{where}: content must be a string or a list of parts, "
                                   f"got {type(content).__name__}")
    parts = []
    for part in content:
        if not isinstance(part, Mapping):
            raise E.ConfigurationError(f"{where}: a content part must be a dict")
        kind = part.get("type")
        if kind == "text":
            parts.append({"text": part.get("text", "")})
        elif kind == "image_url":
            how, media, data = N.image_of(part, where)
            if how != "base64":
                raise E.ConfigurationError(
                    f"{where}: provider='gemini' takes images inline: give a data: URL "
                    "(data:image/png;base64,...)")
            parts.append({"inlineData": {"mimeType": media, "data": data}})
        elif kind is None:
            parts.append(dict(part))  # Gemini's own part (inlineData, fileData...) as given
        else:
            raise E.ConfigurationError(f"{where}: content part type {kind!r} is not "
                                       "supported by provider='gemini'")
    return parts


# -- JSON Schema -> Gemini's Schema (an OpenAPI 3.0 subset) ------------------------------------
_TYPES = {"string": "STRING", "integer": "INTEGER", "number": "NUMBER", "boolean": "BOOLEAN",
          "array": "ARRAY", "object": "OBJECT"}
# kept as they are (the rest -- additionalProperties, $schema, default, examples, const,
# exclusiveMinimum... -- Gemini refuses or ignores)
_KEPT = ("description", "title", "minItems", "maxItems", "minProperties", "maxProperties",
         "minLength", "maxLength", "pattern", "minimum", "maximum")
_FORMATS = {"STRING": ("date-time", "enum"), "INTEGER": ("int32", "int64"),
            "NUMBER": ("float", "double")}


def response_schema(schema: Mapping[str, Any]) -> Dict[str, Any]:
    """A JSON Schema (as pydantic or semex's own extraction schema writes one) as Gemini's
    responseSchema. Raises ConfigurationError for what that subset cannot say (a recursive
    model, a reference that does not resolve)."""
    defs = dict(schema.get("$defs") or {})
    defs.update(schema.get("definitions") or {})
    return _convert(schema, defs, (), "response schema")


def _convert(s: Any, defs: Dict[str, Any], stack: tuple, where: str) -> Dict[str, Any]:
    if not isinstance(s, Mapping):
        if s is True or s == {}:
            return {"type": "STRING"}
        raise E.ConfigurationError(f"{where}: not a schema: {s!r}")
    ref = s.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/") or name not in defs:
            raise E.ConfigurationError(f"{where}: reference {ref!r} does not resolve")
        if name in stack:
            raise E.ConfigurationError(
                f"{where}: {name!r} refers to itself; Gemini's responseSchema cannot express "
                "a recursive model (flatten it, or use structured_output=False)")
        target = _convert(defs[name], defs, stack + (name,), f"{where} -> {name}")
        for key in ("description", "title"):  # the referring site's words win
            if isinstance(s.get(key), str):
                target[key] = s[key]
        return target
    out: Dict[str, Any] = {}
    nullable = False
    options = s.get("anyOf") or s.get("oneOf")
    if isinstance(s.get("allOf"), list) and len(s["allOf"]) == 1 and not options:
        merged = dict(_convert(s["allOf"][0], defs, stack, where))
        out.update(merged)
    if isinstance(options, list):
        kept = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
        nullable = len(kept) < len(options)
        converted = [_convert(o, defs, stack, where) for o in kept]
        if len(converted) == 1:
            out.update(converted[0])
        elif converted:
            out["anyOf"] = converted
    kind = s.get("type")
    if isinstance(kind, list):
        nullable = nullable or "null" in kind
        kinds = [k for k in kind if k != "null"]
        if len(kinds) > 1:
            out["anyOf"] = [_convert(dict(s, type=k), defs, stack, where) for k in kinds]
            kind = None
        else:
            kind = kinds[0] if kinds else None
    if kind == "null":
        nullable, kind = True, None
    if isinstance(kind, str):
        if kind not in _TYPES:
            raise E.ConfigurationError(f"{where}: unknown type {kind!r}")
        out["type"] = _TYPES[kind]
    for key in _KEPT:
        if key in s:
            out[key] = s[key]
    values = s.get("enum")
    if "const" in s:
        values = [s["const"]]
    if isinstance(values, list) and values:
        if all(isinstance(v, str) for v in values):
            out["type"] = "STRING"
            out["enum"] = list(values)
        # other enums: the type stays, the prompt names the values
    fmt = s.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS.get(out.get("type", ""), ()):
        out["format"] = fmt
    props = s.get("properties")
    if isinstance(props, Mapping):
        out.setdefault("type", "OBJECT")
        out["properties"] = {name: _convert(p, defs, stack, f"{where}.{name}")
                             for name, p in props.items()}
        required = [r for r in s.get("required", []) if r in props]
        if required:
            out["required"] = required
        out["propertyOrdering"] = list(props)
    items = s.get("items")
    if isinstance(items, Mapping):
        out.setdefault("type", "ARRAY")
        out["items"] = _convert(items, defs, stack, f"{where}[]")
    if "type" not in out and "anyOf" not in out:
        out["type"] = "STRING"  # an unconstrained value: text is what can always be said
    if nullable:
        out["nullable"] = True
    return out
