"""OpenAI's `response_format` -> a `JsonSpec`, validated at the edge (no torch, cheap to import)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import llguidance

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
# json_object: any JSON object (OpenAI's "JSON mode")
_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class JsonSpec:
    """The output must be one JSON document matching `schema`.

    schema: the schema as compact JSON text; its key order is kept (properties are generated in it).
    strict: a schema keyword the grammar cannot enforce is refused (OpenAI's `strict: true`); when
    False it is ignored, and the output matches the rest of the schema only.
    """

    schema: str
    strict: bool = True

    def grammar(self) -> str:
        """The llguidance grammar text: compact JSON (no whitespace between tokens).

        NOTE: flexible whitespace lets a small model loop on spaces and newlines until max_tokens;
        compact output is still any parser's JSON and it is the shortest.
        """
        return llguidance.LLMatcher.grammar_from_json_schema(
            self.schema, defaults={"whitespace_flexible": False}, overrides={"lenient": not self.strict})


def parse_response_format(response_format: Optional[Mapping[str, Any]]) -> Optional[JsonSpec]:
    """None for free text (absent or `{"type": "text"}`), else the `JsonSpec` to decode under.

    Raises ValueError whose message starts with the offending field (`response_format.json_schema.name: ...`):
    the router returns it as a 400 with `param: "response_format"`.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format: must be an object")
    kind = response_format.get("type")
    if kind not in _KEYS:
        raise ValueError(f"response_format.type: must be one of {sorted(_KEYS)}, got {kind!r}")
    extra = set(response_format) - _KEYS[kind]
    if extra:
        raise ValueError(f"response_format.{sorted(extra)[0]}: not allowed with type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return _checked(_ANY_OBJECT, strict=True, field="response_format")

    body = response_format.get("json_schema")
    if not isinstance(body, Mapping):
        raise ValueError("response_format.json_schema: required, an object with name and schema")
    extra = set(body) - _SCHEMA_KEYS
    if extra:
        raise ValueError(f"response_format.json_schema.{sorted(extra)[0]}: unknown field")
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("response_format.json_schema.name: required, 1-64 characters of a-z, A-Z, 0-9, _ and -")
    if body.get("description") is not None and not isinstance(body["description"], str):
        raise ValueError("response_format.json_schema.description: must be a string")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError("response_format.json_schema.strict: must be a boolean")
    schema = body.get("schema", {})  # OpenAI: optional; absent = any JSON value
    if not isinstance(schema, Mapping):
        raise ValueError("response_format.json_schema.schema: must be a JSON Schema object")
    return _checked(schema, strict=bool(strict), field="response_format.json_schema.schema")


def _checked(schema: Any, strict: bool, field: str) -> JsonSpec:
    """The spec, once llguidance compiled its grammar without error (tokenizer-independent checks)."""
    try:
        spec = JsonSpec(json.dumps(schema, separators=(",", ":")), strict)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec.grammar())
    except (TypeError, ValueError) as e:  # not JSON-serialisable
        is_error, messages = True, [str(e)]
    if is_error:
        raise ValueError(f"{field}: {messages[0]}")
    return spec
