"""LLMCompiler plans: numbered lines `1. search("x")`, `2. summarize($1)`, then `<END_OF_PLAN>`.

The first numbered line opens a call named "plan"; each complete numbered line (ended by a
newline, `<END_OF_PLAN>` or `close()`) is a `Line`; other lines (thoughts) are `Text`.
`CallEnd.args` is the plan's numbered lines joined by newlines. A step whose arguments span
several lines is not supported. `parse_step` splits a line into (step, tool, args, deps).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from conveyor.tools.parsers.base import StreamParser
from conveyor.tools.parsers.events import CallEnd, CallStart, Line

END_OF_PLAN = "<END_OF_PLAN>"
_NUMBERED = re.compile(r"\s*\d+\.\s*\S")
_STEP = re.compile(r"\s*(\d+)\.\s*([A-Za-z_]\w*)\((.*)\)\s*$")
_REFERENCE = re.compile(r"\$\{?(\d+)\}?")


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One plan line: its number, tool name, raw argument text and the steps it refers to."""

    step: int
    tool: str
    args: str
    deps: tuple[int, ...]


def parse_step(line: str) -> PlanStep | None:
    """Parse `3. tool(args)`; `$1` / `${1}` in args become deps. None if the line is no step."""
    match = _STEP.match(line)
    if match is None:
        return None
    args = match.group(3)
    deps = tuple(dict.fromkeys(int(n) for n in _REFERENCE.findall(args)))
    return PlanStep(int(match.group(1)), match.group(2), args, deps)


class PlanParser(StreamParser):
    """Streaming parser for numbered plan lines."""

    __slots__ = ("_index", "_line", "_steps")

    def __init__(self) -> None:
        super().__init__()
        self._line: list[str] = []
        self._index: int | None = None
        self._steps: list[str] = []

    def _step(self, c: str) -> None:
        self._line.append(c)
        if c == "\n":
            self._on_line("".join(self._line))
            self._line = []
        elif c == ">" and "".join(self._line).endswith(END_OF_PLAN):
            self._on_line("".join(self._line)[: -len(END_OF_PLAN)])
            self._line = []
            self._end_plan()

    def _on_line(self, line: str) -> None:
        """A complete line: a plan step or text."""
        if not _NUMBERED.match(line):
            if line:
                self._add_text(line)
            return
        if self._index is None:
            self._index = self._new_index()
            self._emit(CallStart(self._index, "plan"))
        self._steps.append(line.strip())
        self._emit(Line(self._index, line.strip()))

    def _end_plan(self) -> None:
        if self._index is not None:
            self._emit(CallEnd(self._index, "\n".join(self._steps)))
        self._index = None
        self._steps = []

    def _finish(self) -> None:
        self._on_line("".join(self._line))
        self._line = []
        self._end_plan()
