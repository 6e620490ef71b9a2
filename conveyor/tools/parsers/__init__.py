"""Streaming tool-call parsers: push text with `feed(text) -> list[Event]`, end with `close()`.

Events (`events.py`): CallStart(index, name), FieldDone(index, key, value),
Line(index, text), CallEnd(index, args), Text(delta). `index` counts calls in the response
from 0. Any split of a text into feeds yields the same events as the whole text, except
that Text deltas may be cut differently (merge adjacent ones to compare).

`make_parser(kind)` builds one parser per response:
- "hermes": JSON calls in `<tool_call>` tags, ```json / ```tool_call fences (any case) or
  bare JSON objects (`hermes.py`); a block may hold one call object or a JSON list of them
  (one call per element); FieldDone per top-level argument; malformed JSON never raises:
  a named call ends with `CallEnd(index, raw_json_text)`, an unnamed block goes out as Text.
- "python": ```python fences, a call named "python", a Line per top-level statement,
  CallEnd with the code string (`python_code.py`).
- "plan": LLMCompiler numbered plan lines, a call named "plan", a Line per step (a step
  may span lines until its brackets close), CallEnd with the plan text (`plan.py`;
  `parse_step` gives step, tool, args, deps).
- "auto": the "hermes" formats and ```python fences in the same response, each emitted
  exactly as its own parser does, call indices counting across both (`auto.py`).
`lenient=False` makes "hermes" and "auto" strict: JSON calls only inside `<tool_call>` tags,
fences and bare JSON lines are text (what an API serves unless the client opts in).
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.tools.parsers.auto import AutoParser
from conveyor.tools.parsers.base import StreamParser
from conveyor.tools.parsers.events import (
    CallEnd,
    CallStart,
    Event,
    FieldDone,
    Line,
    Text,
)
from conveyor.tools.parsers.hermes import HermesParser
from conveyor.tools.parsers.plan import PlanParser, PlanStep, parse_step
from conveyor.tools.parsers.python_code import PythonParser


@dataclass(frozen=True, slots=True)
class CallFormat:
    """One way models write calls, declared once: its parser, how a call is written where the
    engine forces one (`markers`: its opening and closing text), and whether its calls are a
    body of lines (python, plan: not JSON, so never constrained by a grammar and not listed as
    JSON functions in the chat template)."""

    name: str
    parser: type[StreamParser]
    body: bool = False
    markers: tuple[str, str] = ("", "")


HERMES_CALL = ("<tool_call>\n", "\n</tool_call>")  # the Hermes/Qwen call's start and end
FORMATS: dict[str, CallFormat] = {
    f.name: f
    for f in (
        CallFormat("hermes", HermesParser, markers=HERMES_CALL),
        CallFormat("python", PythonParser, body=True),
        CallFormat("plan", PlanParser, body=True),
        CallFormat("auto", AutoParser, markers=HERMES_CALL),
    )
}
BODY_FORMATS = tuple(name for name, f in FORMATS.items() if f.body)


def default_format(tools: object) -> str:
    """The call format of a request that names none: "auto" (JSON calls and ```python fences)
    where the python tool is offered (`tools`: names, or specs by name), else "hermes"."""
    return "auto" if "python" in tools else "hermes"


def make_parser(kind: str, lenient: bool = True) -> StreamParser:
    """A fresh parser for one response; `kind` is "hermes", "python", "plan" or "auto";
    `lenient` (JSON calls in fences and bare JSON too) applies to "hermes" and "auto"."""
    try:
        cls = FORMATS[kind].parser
    except KeyError:
        raise ValueError(f"unknown parser kind {kind!r}; known: {sorted(FORMATS)}") from None
    return cls(lenient) if issubclass(cls, HermesParser) else cls()


__all__ = [
    "BODY_FORMATS",
    "FORMATS",
    "HERMES_CALL",
    "CallEnd",
    "CallFormat",
    "CallStart",
    "Event",
    "FieldDone",
    "Line",
    "PlanStep",
    "StreamParser",
    "Text",
    "default_format",
    "make_parser",
    "parse_step",
]
