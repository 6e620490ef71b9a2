"""Incremental JSON scanner: reports each value the moment its text is complete.

It tracks containers, strings and escapes one character at a time; it does not decode
values (callers run `json.loads` on the reported text), so a `\\uXXXX` escape or a surrogate
pair split across feeds needs no special care. Numbers and literals complete only when a
delimiter follows them (`,` `}` `]` or whitespace), since "12" may continue as "123".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_SCALAR_START = frozenset("-0123456789tfn")
_DELIMITERS = frozenset(",]} \t\r\n")


@dataclass(slots=True)
class Frame:
    """An open container; `phase` is what it expects next: key, colon, value or comma."""

    kind: str
    phase: str
    key: str | None = None
    start: int = 0


@dataclass(frozen=True, slots=True)
class Value:
    """A completed value: `path` holds the key (or None in arrays) of each enclosing container."""

    path: tuple[str | None, ...]
    text: str


class JsonScanner:
    """Push characters with `push`; read `malformed` and `finished` after each one."""

    __slots__ = ("_chars", "_escape", "_in", "_is_key", "_start", "finished", "malformed", "stack")

    def __init__(self) -> None:
        self.stack: list[Frame] = []
        self.malformed = False
        self.finished = False
        self._chars: list[str] = []
        self._start = 0
        self._in = ""  # "" outside a token, '"' in a string, "s" in a number or literal
        self._escape = False
        self._is_key = False

    def push(self, c: str) -> list[Value]:
        """Consume one character; return the values it completed (innermost first)."""
        self._chars.append(c)
        if self.malformed or self.finished:
            self.malformed = True
            return []
        if self._in == '"':
            return self._string_char(c)
        done: list[Value] = []
        if self._in == "s":
            if c not in _DELIMITERS:
                return done
            self._in = ""
            done.append(self._complete(len(self._chars) - 1))
        self._structural(c, done)
        return done

    def _string_char(self, c: str) -> list[Value]:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            self._in = ""
            if self._is_key:
                self._set_key()
                return []
            return [self._complete(len(self._chars))]
        return []

    def _set_key(self) -> None:
        frame = self.stack[-1]
        try:
            frame.key = json.loads("".join(self._chars[self._start :]))
        except ValueError:
            self.malformed = True
        frame.phase = "colon"

    def _structural(self, c: str, done: list[Value]) -> None:
        """Whitespace, punctuation, or the start of a value."""
        if c in " \t\r\n":
            return
        phase = self.stack[-1].phase if self.stack else "value"
        kind = self.stack[-1].kind if self.stack else ""
        if c in "}]":
            closes = "{" if c == "}" else "["
            if kind != closes or phase not in ("comma", "key" if c == "}" else "value"):
                self.malformed = True
                return
            frame = self.stack.pop()
            done.append(self._complete(len(self._chars), frame.start))
        elif c == ":" and phase == "colon":
            self.stack[-1].phase = "value"
        elif c == "," and phase == "comma":
            self.stack[-1].phase = "key" if kind == "{" else "value"
        elif c == '"' and phase in ("key", "value"):
            self._in, self._is_key, self._start = '"', phase == "key", len(self._chars) - 1
        elif phase == "value" and c in "{[":
            self.stack.append(Frame(c, "key" if c == "{" else "value", start=len(self._chars) - 1))
        elif phase == "value" and c in _SCALAR_START:
            self._in, self._start = "s", len(self._chars) - 1
        else:
            self.malformed = True

    def _complete(self, end: int, start: int | None = None) -> Value:
        """Close the value ending before `end`; the enclosing container now expects a comma."""
        begin = self._start if start is None else start
        if self.stack:
            self.stack[-1].phase = "comma"
        else:
            self.finished = True
        path = tuple(frame.key for frame in self.stack)
        return Value(path, "".join(self._chars[begin:end]))
