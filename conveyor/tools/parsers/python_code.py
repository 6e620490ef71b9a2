"""```python fences for a code interpreter: one call named "python" per fence.

Each complete top-level statement yields a `Line`: a statement is complete when the next
non-indented line starts (not `else`/`elif`/`except`/`finally`/`case`) and the statement
so far parses with `ast`, or when the fence closes. Blank and comment lines between
statements are skipped. `CallEnd.args` is the whole code string. At `close()` without a
closing fence, the last statement is emitted only if it parses (it may be cut short).
A statement that never parses is held until the fence closes and then emitted as one Line.

`PythonBody` handles the inside of one fence, so that other parsers (`auto.py`) can host
python fences next to their own formats.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from conveyor.tools.parsers.base import MarkerParser
from conveyor.tools.parsers.events import CallEnd, CallStart, Event, Line

PYTHON_MARKERS = ("```python\n", "```py\n")
_CONTINUATION = re.compile(r"(else|elif|except|finally|case)\b")


class PythonBody:
    """The code of one fence, pushed one character at a time; emits CallStart at once,
    a Line per statement, and CallEnd when the fence closes (`step` returns True) or at
    `close()`."""

    __slots__ = ("_code", "_emit", "_index", "_line", "_statement")

    def __init__(self, index: int, emit: Callable[[Event], None]) -> None:
        self._index = index
        self._emit = emit
        self._line: list[str] = []
        self._code: list[str] = []
        self._statement: list[str] = []
        emit(CallStart(index, "python"))

    def step(self, c: str) -> bool:
        """One character of the fence; True when it closed the fence (the call ended)."""
        self._line.append(c)
        if c == "\n":
            self._on_line("".join(self._line))
            self._line = []
        elif c == "`" and "".join(self._line).strip() == "```":
            self._line = []
            self._end(fenced=True)
            return True
        return False

    def close(self) -> None:
        """The response ended inside the fence."""
        rest = "".join(self._line)
        if rest and not rest.strip().startswith("```"):
            self._on_line(rest)
        self._end(fenced=False)

    def _on_line(self, line: str) -> None:
        """A complete physical line of code."""
        self._code.append(line)
        if not self._statement and (not line.strip() or line.lstrip().startswith("#")):
            return
        starts = line[:1] not in " \t\n#" and not _CONTINUATION.match(line)
        if starts and self._statement and _parses(self._statement):
            self._emit(Line(self._index, "".join(self._statement).rstrip()))
            self._statement = []
        self._statement.append(line)

    def _end(self, fenced: bool) -> None:
        """Flush the last statement and end the call."""
        if self._statement and (fenced or _parses(self._statement)):
            self._emit(Line(self._index, "".join(self._statement).rstrip()))
        self._emit(CallEnd(self._index, "".join(self._code)))


class PythonParser(MarkerParser):
    """Streaming parser for ```python / ```py fences."""

    __slots__ = ("_body",)

    def __init__(self) -> None:
        super().__init__(PYTHON_MARKERS)
        self._body: PythonBody | None = None

    def _open(self, marker: str) -> None:
        self._body = PythonBody(self._new_index(), self._emit)

    def _step(self, c: str) -> None:
        if self._body is None:
            self._text_step(c)
        elif self._body.step(c):
            self._body = None

    def _finish(self) -> None:
        if self._body is None:
            self._flush_held()
        else:
            self._body.close()
            self._body = None


def _parses(lines: list[str]) -> bool:
    """Whether the lines form complete Python source."""
    try:
        ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return False
    return True
