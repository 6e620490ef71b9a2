"""LLMCompiler plans: numbered lines `1. search("x")`, `2. summarize($1)`, then `<END_OF_PLAN>`.

The first numbered line opens a call named "plan"; each complete step is a `Line`; other
lines (thoughts) are `Text`. A step may span several lines: it is complete at a newline
once its brackets and triple-quoted strings are closed (Python's tokenizer finds nothing
open), at `<END_OF_PLAN>`, at `close()`, or when a new step line (`N. name(` at the start
of a line) begins while it is still open. `CallEnd.args` is the plan's steps joined by
newlines. `parse_step` splits a step into (step, tool, args, deps).
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass

from conveyor.tools.parsers.base import StreamParser
from conveyor.tools.parsers.events import CallEnd, CallStart, Line

END_OF_PLAN = "<END_OF_PLAN>"
_NUMBERED = re.compile(r"\s*\d+\.\s*\S")
_STEP_START = re.compile(r"\d+\.\s*[A-Za-z_]\w*\(")
_STEP = re.compile(r"\s*(\d+)\.\s*([A-Za-z_]\w*)\((.*)\)\s*$", re.DOTALL)
_REFERENCE = re.compile(r"\$\{?(\d+)\}?")


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One plan step: its number, tool name, raw argument text and the steps it refers to."""

    step: int
    tool: str
    args: str
    deps: tuple[int, ...]


def parse_step(line: str) -> PlanStep | None:
    """Parse `3. tool(args)` (args may span lines); `$1` / `${1}` in args become deps.
    None if the text is no step."""
    match = _STEP.match(line)
    if match is None:
        return None
    args = match.group(3)
    deps = tuple(dict.fromkeys(int(n) for n in _REFERENCE.findall(args)))
    return PlanStep(int(match.group(1)), match.group(2), args, deps)


class PlanParser(StreamParser):
    """Streaming parser for numbered plan lines."""

    __slots__ = ("_index", "_line", "_open_step", "_steps")

    def __init__(self) -> None:
        super().__init__()
        self._line: list[str] = []
        self._open_step: list[str] = []  # lines of a step whose brackets are still open
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
        """A complete physical line: part of a step, a new step, or text."""
        if self._open_step and _STEP_START.match(line):
            self._end_step()
        if not self._open_step:
            if not _NUMBERED.match(line):
                self._add_text(line)
                return
            if self._index is None:
                self._index = self._new_index()
                self._emit(CallStart(self._index, "plan"))
        self._open_step.append(line)
        if not _is_open("".join(self._open_step)):
            self._end_step()

    def _end_step(self) -> None:
        """Emit the gathered step as one Line."""
        assert self._index is not None, "a step is open only inside the plan call"
        step = "".join(self._open_step).strip()
        self._open_step = []
        self._steps.append(step)
        self._emit(Line(self._index, step))

    def _end_plan(self) -> None:
        if self._open_step:
            self._end_step()
        if self._index is not None:
            self._emit(CallEnd(self._index, "\n".join(self._steps)))
        self._index = None
        self._steps = []

    def _finish(self) -> None:
        self._on_line("".join(self._line))
        self._line = []
        self._end_plan()


def _is_open(step: str) -> bool:
    """Whether a bracket or a triple-quoted string of the step is still open."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(step).readline):
            pass
    except tokenize.TokenError:
        return True
    except SyntaxError:  # e.g. bad indentation: nothing can be open
        return False
    return False
