"""What to extract: output columns -> prompt text, JSON schema, row validation.

``output_cols`` is either a mapping of column name to a description (or None), as in LOTUS,
or a pydantic model class whose typed fields (int, float, bool, enums, lists, ...) define the
columns; then values are validated and arrive typed.
"""
from __future__ import annotations

import enum
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigurationError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ \-]*$")


class RowInvalid(ValueError):
    """A parsed row does not satisfy the output spec (the message says why)."""


REASONING_KEY = "reasoning"  # what the model fills first under a chain-of-thought strategy

# Column kinds of the C row reader (csrc/module_rows.c): an untyped column (a string stripped,
# blank None; other scalars as they are); a quote or the reasoning (a string as it is).
_KIND_STRIP, _KIND_TEXT = 0, 1


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
        model). Rows the reader cannot read exactly still come back to ``validate``."""
        if self.model is not None:
            return None
        names = tuple(self.columns + self.quote_columns
                      + ([REASONING_KEY] if self.reasoning else []))
        kinds = bytes([_KIND_STRIP] * len(self.columns)
                      + [_KIND_TEXT] * (len(names) - len(self.columns)))
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
