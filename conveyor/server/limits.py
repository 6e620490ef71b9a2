"""Limits on what a request may contain, checked before anything reaches the engine.

The chat template (Jinja) and the grammar compiler (xgrammar) are not written for hostile
input: a lone surrogate makes the tokenizer raise, a schema nested a few hundred levels deep
exhausts the template's recursion, a huge schema takes the compiler minutes. So every string
of a request must be valid Unicode, every value nests at most `MAX_DEPTH` levels, and tool
schemas and call arguments have size bounds of their own. Pure Python, no pydantic: the
protocol models call these checks.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # nesting of any value in a request body
MAX_SCHEMA_DEPTH = 32  # nesting of one tool's parameters schema
MAX_SCHEMA_CHARS = 64 * 1024  # one tool's parameters schema as JSON
MAX_TOOLS = 128  # tools offered by one request
MAX_ARGUMENT_CHARS = 256 * 1024  # one tool call's arguments string (in the conversation's history)
MAX_STOPS = 16  # stop strings of one request (each is matched after every token)
MAX_STOP_CHARS = 256  # one stop string


class InputRejected(Exception):
    """Bad input, found where pydantic cannot name the parameter: `param` is its dotted path.

    Deliberately not a ValueError: raised inside a validator, it passes through pydantic
    to the app's handler (a 400 naming `param`) instead of becoming a generic error."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message = param, message


def check_value(value: Any, path: str = "", max_depth: int = MAX_DEPTH) -> None:
    """Raise InputRejected if a string in `value` (keys included) is not valid Unicode (a lone
    surrogate) or `value` nests deeper than `max_depth`. Iterative: deep input cannot make
    this check itself overflow the stack."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= max_depth:
            raise InputRejected(where, f"nests deeper than {max_depth} levels")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            child_path = f"{where}.{_printable(str(key))}" if where else _printable(str(key))
            if isinstance(key, str):
                _check_text(key, child_path)
            stack.append((child, child_path, depth + 1))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputRejected(
            where, f"character {e.start} is a lone surrogate ({text[e.start]!r}), not valid Unicode"
        ) from None


def _printable(key: str) -> str:
    """A key as it may appear in an error (a lone surrogate escaped)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def check_schema(schema: dict[str, Any]) -> None:
    """A tool's parameters schema: bounded depth and size (ValueError for pydantic)."""
    try:
        check_value(schema, max_depth=MAX_SCHEMA_DEPTH)
    except InputRejected as e:
        raise ValueError(f"the schema {e.message} (at {e.param or 'its top'})") from None
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema is {size} characters as JSON; the limit is {MAX_SCHEMA_CHARS}")


def decode_arguments(arguments: str) -> Any:
    """A call's arguments as a JSON value (the raw string when it is not JSON), checked like
    the rest of the body: the JSON inside the string can hide deep nesting or escaped lone
    surrogates. Raises ValueError for pydantic."""
    if len(arguments) > MAX_ARGUMENT_CHARS:
        raise ValueError(f"arguments are {len(arguments)} characters; the limit is {MAX_ARGUMENT_CHARS}")
    try:
        value = json.loads(arguments)
    except RecursionError:
        raise ValueError(f"arguments nest deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        return arguments
    try:
        check_value(value)
    except InputRejected as e:
        raise ValueError(f"arguments: {e}") from None
    return value
