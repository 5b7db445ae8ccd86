"""What to extract: output columns -> prompt text, JSON schema, row validation.

``output_cols`` is either a mapping of column name to a description (or None), as in LOTUS,
or a pydantic model class whose typed fields (int, float, bool, enums, lists, ...) define the
columns; then values are validated and arrive typed.
"""
from __future__ import annotations

import enum
import json
import re
import types
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigurationError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ \-]*$")


class RowInvalid(ValueError):
    """A parsed row does not satisfy the output spec (the message says why)."""


REASONING_KEY = "reasoning"  # what the model fills first under a chain-of-thought strategy

# Column kinds of the C row reader (csrc/module_rows.c): an untyped column (a string stripped,
# blank None; other scalars as they are); a quote or the reasoning (a string as it is); a
# typed field's str, int, float or bool, | _KIND_NULLABLE when None is allowed.
_KIND_STRIP, _KIND_TEXT, _KIND_STR, _KIND_INT, _KIND_FLOAT, _KIND_BOOL = range(6)
_KIND_NULLABLE = 0x80


class OutputSpec:
    """``reasoning=True`` (LOTUS's COT / ZS_COT strategies): every answer object starts with
    a "reasoning" string, the model's brief step-by-step thinking, before the fields (in
    structured output too: the key comes first in the schema, so it is generated first).
    It is returned as the row's explanation (``row[REASONING_KEY]`` from ``validate``), not
    as an output column."""

    def __init__(self, output_cols: Any, extract_quotes: bool, reasoning: bool = False):
        self.model = None
        if isinstance(output_cols, type) and hasattr(output_cols, "model_fields") and \
                hasattr(output_cols, "model_validate"):
            self.model = output_cols
            fields = output_cols.model_fields
            if not fields:
                raise ConfigurationError("output_cols model has no fields")
            self.descriptions = {name: (f.description or None) for name, f in fields.items()}
        elif isinstance(output_cols, Mapping):
            if not output_cols:
                raise ConfigurationError("output_cols is empty: name at least one column "
                                         "to extract, e.g. {'sentiment': 'positive/negative'}")
            self.descriptions = {}
            for name, description in output_cols.items():
                if not isinstance(name, str) or not _NAME.match(name):
                    raise ConfigurationError(
                        f"output_cols key {name!r} is not a usable column name")
                if description is not None and not isinstance(description, str):
                    raise ConfigurationError(
                        f"output_cols[{name!r}] must be a description str or None, got "
                        f"{type(description).__name__}")
                self.descriptions[name] = description
        else:
            raise ConfigurationError(
                "output_cols must map names to descriptions (e.g. {'sentiment': "
                "'positive/negative/neutral', 'product': None}) or be a pydantic model "
                f"class; got {type(output_cols).__name__}")
        self.columns: List[str] = list(self.descriptions)
        self.extract_quotes = extract_quotes
        self.quote_columns = [f"{c}_quote" for c in self.columns] if extract_quotes else []
        for q in self.quote_columns:
            if q in self.descriptions:
                raise ConfigurationError(f"output column {q!r} collides with the quote column "
                                         "extract_quotes adds")
        self.all_columns = self.columns + self.quote_columns
        self.reasoning = reasoning
        if reasoning and REASONING_KEY in self.all_columns:
            raise ConfigurationError(
                f"output column {REASONING_KEY!r} collides with the reasoning a "
                "chain-of-thought strategy adds; rename it or drop the strategy")
        # the keys of one answer object, in the order the model should write them
        self.answer_keys = ([REASONING_KEY] if reasoning else []) + self.all_columns

    # -- prompts ------------------------------------------------------------------------
    def field_lines(self) -> str:
        lines = []
        for name in self.columns:
            description = self.descriptions[name]
            hint = ""
            if self.model is not None:
                hint = _type_hint(self.model.model_fields[name].annotation)
            text = f'- "{name}"'
            if description:
                text += f": {description}"
            if hint:
                text += f" ({hint})"
            lines.append(text)
        return "\n".join(lines)

    # -- JSON schema ----------------------------------------------------------------------
    def row_schema(self, with_id: bool) -> Tuple[Dict[str, Any], bool]:
        """(schema of one row, whether it qualifies for strict mode)."""
        if self.model is not None:
            schema = self.model.model_json_schema()
            strict = False
        else:
            props = {}
            for name in self.columns:
                prop: Dict[str, Any] = {"type": ["string", "null"]}
                if self.descriptions[name]:
                    prop["description"] = self.descriptions[name]
                props[name] = prop
            schema = {"type": "object", "properties": props}
            strict = True
        schema = dict(schema)
        props = dict(schema.get("properties", {}))
        for q in self.quote_columns:
            props[q] = {"type": ["string", "null"],
                        "description": "verbatim span of the document supporting "
                                       + q[:-len("_quote")]}
        if self.reasoning:
            props = {REASONING_KEY: {"type": "string",
                                     "description": "brief step-by-step reasoning that "
                                                    "leads to the values"}, **props}
        if with_id:
            props = {"id": {"type": "integer"}, **props}
        schema["properties"] = props
        if strict:
            required = list(props)
        else:
            wanted = set(schema.get("required", [])) | set(self.quote_columns) | {
                "id", REASONING_KEY}
            required = [p for p in props if p in wanted]
        schema["required"] = required
        schema["additionalProperties"] = False
        return schema, strict

    def response_format(self, mode: Any, batch: bool) -> Optional[Dict[str, Any]]:
        if not mode:
            return None
        row, strict = self.row_schema(with_id=batch)
        if batch:
            defs = row.pop("$defs", None)
            schema: Dict[str, Any] = {
                "type": "object",
                "properties": {"results": {"type": "array", "items": row}},
                "required": ["results"],
                "additionalProperties": False,
            }
            if defs:
                schema["$defs"] = defs
        else:
            schema = row
        if mode == "json_object":  # llama.cpp's server: JSON mode constrained by a schema
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema",
                "json_schema": {"name": "extraction_batch" if batch else "extraction",
                                "schema": schema, "strict": strict}}

    # -- validation -----------------------------------------------------------------------
    def row_reader(self) -> Optional[Tuple[Tuple[str, ...], bytes]]:
        """(keys, kinds) for the C reader (``_engine.read_rows``) when it can read this
        spec's answers exactly as :meth:`validate` would: the row's keys in ``validate``'s
        order, each with its kind; None when every answer must be read in Python (a typed
        model with a field the reader does not reproduce, see _typed_kinds). Rows the
        reader cannot read exactly still come back to ``validate``."""
        if self.model is not None:
            columns = _typed_kinds(self.model)
            if columns is None:
                return None
        else:
            columns = [_KIND_STRIP] * len(self.columns)
        names = tuple(self.columns + self.quote_columns
                      + ([REASONING_KEY] if self.reasoning else []))
        kinds = bytes(columns + [_KIND_TEXT] * (len(names) - len(self.columns)))
        return names, kinds

    def validate(self, obj: Any) -> Dict[str, Any]:
        """A parsed JSON object -> the output row (every column present). Raises RowInvalid."""
        if not isinstance(obj, dict):
            raise RowInvalid(f"expected a JSON object, got {type(obj).__name__}")
        if self.model is not None:
            values = {k: v for k, v in obj.items() if k in self.descriptions}
            try:
                parsed = self.model.model_validate(values)
            except Exception as exc:  # pydantic.ValidationError, without importing pydantic
                raise RowInvalid(_short_validation_text(exc)) from None
            row = {name: _plain(getattr(parsed, name)) for name in self.columns}
        else:
            row = {name: _scalar(obj.get(name)) for name in self.columns}
        for q in self.quote_columns:
            value = obj.get(q)
            row[q] = value if value is None or isinstance(value, str) else str(value)
        if self.reasoning:
            value = obj.get(REASONING_KEY)
            row[REASONING_KEY] = value if value is None or isinstance(value, str) \
                else json.dumps(value, ensure_ascii=False)
        return row


_TYPED_KINDS = {str: _KIND_STR, int: _KIND_INT, float: _KIND_FLOAT, bool: _KIND_BOOL}
# model_config keys that do not change how a str/int/float/bool field validates
_PLAIN_CONFIG = {"title", "extra", "json_schema_extra", "frozen", "populate_by_name",
                 "protected_namespaces", "arbitrary_types_allowed", "from_attributes",
                 "use_attribute_docstrings", "defer_build", "hide_input_in_errors"}


def _typed_kinds(model: Any) -> Optional[List[int]]:
    """The C reader's kind of each field of a pydantic model, or None unless every field is
    exactly what the reader reproduces: a required ``str``, ``int``, ``float`` or ``bool``
    (or that or None), with no constraint, alias or validator, on a model whose config does
    not change validation (strict, str_strip_whitespace...). For those, pydantic's lax mode
    takes a JSON value of the field's own type unchanged (an int as a float for ``float``);
    every other value, and a missing key, still goes to model_validate."""
    decorators = getattr(model, "__pydantic_decorators__", None)
    if decorators is None or any(getattr(decorators, name, None) for name in (
            "validators", "field_validators", "root_validators", "model_validators")):
        return None
    if set(getattr(model, "model_config", {})) - _PLAIN_CONFIG:
        return None
    kinds = []
    for name, info in model.model_fields.items():
        annotation, nullable = info.annotation, 0
        args = typing.get_args(annotation)
        if type(None) in args and len(args) == 2 and typing.get_origin(annotation) in (
                typing.Union, getattr(types, "UnionType", typing.Union)):
            annotation = args[0] if args[1] is type(None) else args[1]
            nullable = _KIND_NULLABLE
        kind = _TYPED_KINDS.get(annotation) if isinstance(annotation, type) else None
        if kind is None or info.metadata or (info.alias not in (None, name)) or \
                info.validation_alias is not None:
            return None
        kinds.append(kind | nullable)
    return kinds


def _scalar(value: Any) -> Any:
    # keep JSON's types for scalars; nested structures stay as parsed
    if isinstance(value, str):
        value = value.strip()
        return value if value else None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def _type_hint(annotation: Any) -> str:
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return "one of: " + ", ".join(json.dumps(m.value) for m in annotation)
        if annotation is bool:
            return "true or false"
        if annotation is int:
            return "an integer"
        if annotation is float:
            return "a number"
        if annotation is str:
            return "text"
    text = str(annotation).replace("typing.", "")
    return text if len(text) < 80 else ""


def _short_validation_text(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                     for e in errors()]
            return "; ".join(parts)[:500]
        except Exception:
            pass
    return str(exc)[:500]


# strict=False: small local models sometimes emit raw control characters in strings. One
# decoder for every answer (json.loads(..., strict=False) builds a new one per call).
_LENIENT = json.JSONDecoder(strict=False)


def parse_json_answer(text: Optional[str]) -> Any:
    """The JSON value in a model's answer, tolerating code fences and prose around it.
    Raises ValueError if there is none (a value nested too deep for the decoder included)."""
    if text is None:
        raise ValueError("the answer is empty")
    s = text.strip()
    try:
        try:
            return _LENIENT.decode(s)
        except ValueError:
            pass
        fence = re.search(r"```(?:json|JSON)?\s*(.*?)```", s, re.S)
        if fence:
            try:
                return _LENIENT.decode(fence.group(1).strip())
            except ValueError:
                pass
        for match in re.finditer(r"[\[{]", s):
            try:
                value, _ = _LENIENT.raw_decode(s, match.start())
                return value
            except ValueError:
                continue
    except RecursionError:
        raise ValueError("the answer's JSON is nested too deep to read") from None
    raise ValueError("no JSON object found in the answer")
