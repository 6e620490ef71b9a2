"""Events that the streaming call parsers emit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call's name is known; `index` counts calls in the response from 0."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class FieldDone:
    """A top-level argument's value is complete (any JSON type)."""

    index: int
    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class Line:
    """A complete line or statement of a code or plan body."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class CallEnd:
    """The call is over: parsed arguments, or its raw text when it could not be parsed."""

    index: int
    args: dict | str


@dataclass(frozen=True, slots=True)
class Text:
    """Plain text outside calls."""

    delta: str


Event = CallStart | FieldDone | Line | CallEnd | Text
