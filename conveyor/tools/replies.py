"""What a tool worker sends its pool, and how: JSON, never pickle.

The worker's process runs the model's code, which can write anything to the worker's end of
the pipe; unpickling that in the server would run whatever it names. So replies travel as
JSON (`encode`) and the pool rebuilds them with every field's type checked (`decode`, which
raises ValueError for anything else: the pool then treats the worker as broken).
Worker -> pool: Ready or Failed (once, at start), then Began (each message taken, before it
is handled) and Idle (all handled, nothing queued), Done (a call's result) and Cancelled (a
Cancel's acknowledgement).
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass
from typing import Any

from conveyor.tools.base import ToolResult
from conveyor.tools.sandbox import Report

MAX_REPLY_BYTES = 1 << 20  # results are cut to 16 K characters before they are sent


@dataclass(frozen=True, slots=True)
class Ready:
    report: Report  # what its sandbox provides


@dataclass(frozen=True, slots=True)
class Began:
    """The worker's main thread took the next message (a hook is about to run)."""


@dataclass(frozen=True, slots=True)
class Idle:
    """The worker's main thread handled everything it was sent and waits for more."""


@dataclass(frozen=True, slots=True)
class Failed:
    error: str


@dataclass(frozen=True, slots=True)
class Done:
    result: ToolResult
    refusals: int = 0  # actions of the call's code that the sandbox's audit hook refused


@dataclass(frozen=True, slots=True)
class Cancelled:
    call_id: str


BEGAN, IDLE = Began(), Idle()
Reply = Ready | Began | Idle | Failed | Done | Cancelled


def encode(reply: Reply) -> bytes:
    match reply:
        case Ready(report=report):
            fields: list[Any] = [list(astuple(report))]
        case Done(result=result, refusals=refusals):
            fields = [list(astuple(result)), refusals]
        case _:
            fields = list(astuple(reply))
    return json.dumps([type(reply).__name__, fields]).encode()


def decode(data: bytes) -> Reply:
    """The reply `data` encodes; ValueError if it is not exactly one well-formed reply."""
    try:
        name, fields = json.loads(data)
        return _build(name, fields)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"a malformed reply from a tool worker ({type(e).__name__})") from e


def _build(name: str, fields: list[Any]) -> Reply:
    match name, fields:
        case "Began", []:
            return BEGAN
        case "Idle", []:
            return IDLE
        case ("Failed" | "Cancelled") as kind, [str() as text]:
            return Failed(text) if kind == "Failed" else Cancelled(text)
        case "Ready", [[list() as applied, list() as missing, int() as abi, str() as root]]:
            return Ready(Report(_strs(applied), tuple((str(a), str(b)) for a, b in missing), abi, root))
        case "Done", [
            [
                str() as call_id,
                str() as tool,
                str() as content,
                bool() as is_error,
                bool() as rejected,
                float() | int() as started,
                float() | int() as done,
                list() as delays,
                list() as queued,
            ],
            int() as refusals,
        ]:
            return Done(
                ToolResult(
                    call_id,
                    tool,
                    content,
                    is_error,
                    rejected,
                    float(started),
                    float(done),
                    _floats(delays),
                    _floats(queued),
                ),
                refusals,
            )
    raise ValueError(f"a malformed reply from a tool worker ({str(name)[:40]!r})")


def _strs(values: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise ValueError("a malformed reply from a tool worker (not strings)")
    return tuple(values)


def _floats(values: list[Any]) -> tuple[float, ...]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError("a malformed reply from a tool worker (not numbers)")
    return tuple(float(v) for v in values)
