"""A request body that does not parse, as OpenAI's 400: in this server's own words, never pydantic's.

`describe(errors)` turns pydantic's error list into (message, param, code): `param` is the field's
path as a client writes it (`messages[0].content`, never a byte offset or a union member's type
name), the message says what the field must be and what it got, and `code` is one of OpenAI's:
`invalid_json`, `missing_required_parameter`, `unknown_parameter`, `invalid_type`, `invalid_value`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# pydantic error type -> what the field must be
TYPES = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}
# a union member, as pydantic names it in `loc` -> what it accepts
MEMBERS = {
    "str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
    "list[str]": "an array of strings", "list[int]": "an array of token ids",
    "list[list[int]]": "an array of arrays of token ids", "list[TextPart]": "an array of text parts",
}


def describe(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) of the first field pydantic refused."""
    first = errors[0]
    if first["type"] == "json_invalid":
        where = first["loc"][-1] if first["loc"] and isinstance(first["loc"][-1], int) else None
        at = f" at character {where}" if where is not None else ""
        return (f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')}{at})",
                None, "invalid_json")
    path, members = _path(first["loc"])
    if not path:
        if first["type"] == "missing":
            return "the request body is empty: send a JSON object", None, "invalid_json"
        return f"the request body must be a JSON object, got {_got(first.get('input'))}", None, "invalid_type"
    if members:  # the value matched no member of a union: say what each accepts
        same = [e for e in errors if _path(e["loc"])[0] == path]
        deeper = [e for e in errors if _path(e["loc"])[0].startswith((path + "[", path + "."))]
        if deeper:  # it had the right shape and failed inside it: the deepest error is the useful one
            best = max(deeper, key=lambda e: len(e["loc"]))
            return _one(best, _path(best["loc"])[0])
        accepted = [MEMBERS.get(m, m) for m in dict.fromkeys(_member(e["loc"]) for e in same) if m]
        return f"{path} must be {_either(accepted)}, got {_got(first.get('input'))}", path, "invalid_type"
    return _one(first, path)


def _one(error: dict[str, Any], path: str) -> tuple[str, str, str]:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return f"{path} is required", path, "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"{path} is not a field this server supports", path, "unknown_parameter"
    if kind in TYPES:
        return f"{path} must be {TYPES[kind]}, got {_got(error.get('input'))}", path, "invalid_type"
    if kind == "literal_error":
        return f"{path} must be {ctx.get('expected')}, got {_got(error.get('input'))}", path, "invalid_value"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"{path} must have at least {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}", \
            path, "invalid_value"
    msg = error.get("msg", "is not valid")
    return f"{path}: {msg[:1].lower()}{msg[1:]}", path, "invalid_value"


def _path(loc: Sequence[Any]) -> tuple[str, bool]:
    """(`messages[0].content`, whether a union member's name was in `loc`) of a pydantic location."""
    path, members = "", False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in MEMBERS or "[" in part:
            members = True
        else:
            path += f".{part}" if path else part
    return path, members


def _member(loc: Sequence[Any]) -> str | None:
    return next((p for p in loc if isinstance(p, str) and (p in MEMBERS or "[" in p)), None)


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _got(value: Any) -> str:
    """A short JSON rendering of what the client sent."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
