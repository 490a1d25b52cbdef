"""The named JSON shapes a user may ask for instead of free text, and strict checks of answers.

Each :class:`Schema` holds the JSON Schema sent to Gemini (as
``response_json_schema``), a sentence added to the prompt, and the key whose
value becomes the record's description. Gemini is asked to follow the schema
but does not always honour every keyword (``maxLength`` above all), so
:func:`validate` checks each answer against the same JSON Schema, walking the
small subset of keywords used here: ``type``, ``properties``, ``required``,
``additionalProperties: false``, ``items``, ``minLength`` and ``maxLength``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

ALT_TEXT_MAX_CHARS = 125  # what screen-reader guidance commonly recommends


class SchemaMismatch(ValueError):
    """An answer that does not fit its schema; the message says what is wrong, briefly."""


@dataclass(frozen=True)
class Schema:
    """One named shape: what Gemini is sent, and which key is the description."""

    name: str
    json_schema: Mapping[str, Any]
    instruction: str  # appended to the user's prompt
    # The prompt when none is given (DESCRIBE_PROMPT left at its three-word default).
    default_prompt: str
    text_key: str  # the value that becomes the record's description


_ALT_TEXT = Schema(
    name="alt_text",
    json_schema={
        "type": "object",
        "properties": {
            "alt_text": {
                "type": "string",
                "description": "Alt text for the image, for a screen reader.",
                "minLength": 1,
                "maxLength": ALT_TEXT_MAX_CHARS,
            },
            "description": {
                "type": "string",
                "description": "A fuller description of the image.",
                "minLength": 1,
            },
            "tags": {
                "type": "array",
                "description": "Short keywords for what the image shows.",
                "items": {"type": "string", "minLength": 1},
            },
            "text_in_image": {
                "type": "string",
                "description": "Text legible in the image; an empty string when there is none.",
            },
        },
        "required": ["alt_text", "description", "tags", "text_in_image"],
        "additionalProperties": False,
    },
    instruction=(
        "Answer with a JSON object. Its alt_text must be at most "
        f"{ALT_TEXT_MAX_CHARS} characters long. Its text_in_image is the text legible "
        "in the image, or an empty string when there is none."
    ),
    text_key="description",
    default_prompt=(
        "Describe this image for someone who cannot see it: what it shows, the setting, "
        "and anything notable."
    ),
)

SCHEMAS: Mapping[str, Schema] = MappingProxyType({_ALT_TEXT.name: _ALT_TEXT})
# "text" asks for free text (the default); the others name a structured answer.
TEXT_SCHEMA = "text"
# Every name a request, the command line or DESCRIBE_SCHEMA may give.
SCHEMA_NAMES = (TEXT_SCHEMA, *sorted(SCHEMAS))

_JSON_TYPES: Mapping[type, str] = MappingProxyType(
    {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
)
_MAX_NAME = 40  # characters of an unexpected key quoted in a message


def validate(name: str, text: str) -> dict[str, Any]:
    """Parse ``text`` as an answer in schema ``name`` and return it with strings trimmed.

    Raises :class:`SchemaMismatch` naming the first problem found, and
    ``KeyError`` for a name that is not in :data:`SCHEMAS`.
    """
    schema = SCHEMAS[name]
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaMismatch(f"the answer is not JSON ({exc.msg}: char {exc.pos})") from None
    checked = _check(answer, schema.json_schema, "the answer")
    if not isinstance(checked, dict):  # every registered schema is an object
        raise SchemaMismatch("the answer is not a JSON object")
    return checked


def _check(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    """``value`` trimmed and checked against ``schema``; ``where`` names it in messages."""
    expected = schema.get("type")
    found = _type_name(value)
    if expected == "number" and found == "integer":
        found = "number"  # JSON Schema counts 3 as a number too
    if expected is not None and found != expected:
        raise SchemaMismatch(f"{where} is {_a(found)}, not {_a(expected)}")
    if isinstance(value, str):
        return _check_string(value.strip(), schema, where)
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_check(item, items, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return _check_object(value, schema, where)
    return value


def _check_string(value: str, schema: Mapping[str, Any], where: str) -> str:
    shortest, longest = schema.get("minLength", 0), schema.get("maxLength")
    if len(value) < shortest:
        raise SchemaMismatch(f"{where} is empty" if value == "" else f"{where} is too short")
    if longest is not None and len(value) > longest:
        raise SchemaMismatch(f"{where} is {len(value)} characters long, over the {longest} allowed")
    return value


def _check_object(value: dict[str, Any], schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    missing = [key for key in schema.get("required", ()) if key not in value]
    if missing:
        raise SchemaMismatch(f"{where} lacks {_keys(missing)}")
    if schema.get("additionalProperties") is False:
        extra = [key for key in value if key not in properties]
        if extra:
            raise SchemaMismatch(f"{where} has unexpected {_keys(extra)}")
    prefix = "" if where == "the answer" else f"{where}."
    return {
        key: _check(item, properties.get(key, {}), f"{prefix}{key}") for key, item in value.items()
    }


def _type_name(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _a(type_name: str) -> str:
    if type_name == "null":
        return type_name
    return f"an {type_name}" if type_name[0] in "aeiou" else f"a {type_name}"


def _keys(names: list[str]) -> str:
    shown = ", ".join(repr(n if len(n) <= _MAX_NAME else n[:_MAX_NAME] + "...") for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"key{'s' if len(names) > 1 else ''} {shown}{more}"
