"""```python fences for a code interpreter: one call named "python" per fence.

Each complete top-level statement yields a `Line`: a statement is complete when the next
non-indented line starts (not `else`/`elif`/`except`/`finally`/`case`) and the statement
so far parses with `ast`, or when the fence closes. Blank and comment lines between
statements are skipped. `CallEnd.args` is the whole code string. At `close()` without a
closing fence, the last statement is emitted only if it parses (it may be cut short).
A statement that never parses is held until the fence closes and then emitted as one Line.
"""
from __future__ import annotations

import ast
import re

from conveyor.tools.parsers.base import MarkerParser
from conveyor.tools.parsers.events import CallEnd, CallStart, Line

_CONTINUATION = re.compile(r"(else|elif|except|finally|case)\b")


class PythonParser(MarkerParser):
    """Streaming parser for ```python / ```py fences."""

    __slots__ = ("_code", "_in_code", "_index", "_line", "_statement")

    def __init__(self) -> None:
        super().__init__(("```python\n", "```py\n"))
        self._in_code = False
        self._index = 0
        self._line: list[str] = []
        self._code: list[str] = []
        self._statement: list[str] = []

    def _open(self, marker: str) -> None:
        self._in_code = True
        self._index = self._new_index()
        self._code, self._statement, self._line = [], [], []
        self._emit(CallStart(self._index, "python"))

    def _step(self, c: str) -> None:
        if not self._in_code:
            self._text_step(c)
            return
        self._line.append(c)
        if c == "\n":
            self._on_line("".join(self._line))
            self._line = []
        elif c == "`" and "".join(self._line).strip() == "```":
            self._line = []
            self._end_call(fenced=True)

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

    def _end_call(self, fenced: bool) -> None:
        """The fence closed (or the response ended): flush the last statement, end the call."""
        if self._statement and (fenced or _parses(self._statement)):
            self._emit(Line(self._index, "".join(self._statement).rstrip()))
        self._emit(CallEnd(self._index, "".join(self._code)))
        self._in_code = False
        self._line_start = False

    def _finish(self) -> None:
        if not self._in_code:
            self._flush_held()
            return
        rest = "".join(self._line)
        if rest and not rest.strip().startswith("```"):
            self._on_line(rest)
        self._end_call(fenced=False)


def _parses(lines: list[str]) -> bool:
    """Whether the lines form complete Python source."""
    try:
        ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return False
    return True
