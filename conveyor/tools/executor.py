"""Routes the parser events of each model turn to tools in workers, partially or lazily.

One `Turn` per model turn of a request: text deltas go in (`feed`), parser events come
out and reach the tools: in "partial" mode each event as soon as it is parsed, in "lazy"
mode all of a call's events at its CallEnd (today's servers; the baseline). Tools whose
side effects are "external" get nothing before the turn has ended cleanly (`end(clean=True)`):
never on an incomplete call, a turn cut by length or abort, and never twice. Calls to unknown
tools, malformed JSON and arguments that do not fit the schema become error results without
running anything. Pure Python: no torch, no asyncio; the pool does the process work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import jsonschema

from conveyor.tools.base import Call, CallInfo, Tool, ToolRegistry, ToolResult
from conveyor.tools.parsers import (
    CallEnd,
    CallStart,
    Event,
    FieldDone,
    Line,
    make_parser,
)
from conveyor.tools.planner import PlanCall

MODES = ("partial", "lazy")


class Pool(Protocol):
    """What the executor needs of a worker pool (`workers.WorkerPool`)."""

    def open_call(self, call: CallInfo, sent_at: float) -> None: ...
    def send_field(self, call_id: str, key: str, value: Any, sent_at: float) -> None: ...
    def send_line(self, call_id: str, line: str, sent_at: float) -> None: ...
    def finish(self, call_id: str, args: dict) -> None: ...
    def cancel(self, call_id: str) -> None: ...
    def poll(self, timeout_s: float = 0.0) -> list[ToolResult]: ...
    def hand_off(self) -> None: ...  # let workers just sent work take it (may wait ~1 ms)
    def num_computing(self) -> int: ...  # workers busy on this machine's CPUs with a tool's code


class ToolExecutor:
    """Owns the turns of all requests and routes worker results back to them."""

    def __init__(self, registry: ToolRegistry, pool: Pool, mode: str = "partial") -> None:
        if mode not in MODES:
            raise ValueError(f"tool mode must be partial or lazy, got {mode!r}")
        self.registry = registry
        self.pool = pool
        self.mode = mode
        self._calls: dict[str, tuple[Turn, Any]] = {}  # call id -> (turn, Call or PlanCall)
        self._validators: dict[str, Any] = {}

    def validator(self, tool: Tool) -> Any:
        """The tool's argument validator, built once (checking a schema per call costs milliseconds)."""
        if tool.name not in self._validators:
            cls = jsonschema.validators.validator_for(tool.parameters)
            cls.check_schema(tool.parameters)
            self._validators[tool.name] = cls(tool.parameters)
        return self._validators[tool.name]

    def open_turn(
        self,
        request_id: str,
        number: int,
        *,
        tools: Iterable[str] | None = None,
        mode: str | None = None,
        parser: str = "hermes",
        lenient: bool = True,
    ) -> Turn:
        """A new turn of `request_id`; `tools` limits the callable tools (default: all);
        `lenient`: JSON calls in fences and bare JSON count too (`make_parser`)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"tool mode must be partial or lazy, got {mode!r}")
        names = self.registry.names if tools is None else list(tools)
        unknown = [n for n in names if n not in self.registry]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; registered: {self.registry.names}")
        allowed = {n: self.registry.get(n) for n in names}
        return Turn(self, f"{request_id}-t{number}", request_id, allowed, mode, parser, lenient)

    def poll(self, timeout_s: float = 0.0) -> set[Turn]:
        """Collect worker results; returns the turns that changed (a result or a rejection)."""
        changed = set()
        for result in self.pool.poll(timeout_s):
            entry = self._calls.pop(result.call_id, None)
            if entry is not None:
                turn, call = entry
                turn.on_result(call, result)
                changed.add(turn)
        return changed

    # ---- used by turns -----------------------------------------------------------------------
    def track(self, turn: Turn, call_id: str, call: Any) -> None:
        self._calls[call_id] = (turn, call)

    def untrack(self, call_id: str) -> None:
        if self._calls.pop(call_id, None) is not None:
            self.pool.cancel(call_id)


class Turn:
    """One model turn of one request: its parser, its calls and their results."""

    def __init__(
        self,
        executor: ToolExecutor,
        turn_id: str,
        request_id: str,
        allowed: dict[str, Tool],
        mode: str,
        parser: str,
        lenient: bool = True,
    ) -> None:
        self.executor = executor
        self.turn_id = turn_id
        self.request_id = request_id
        self.allowed = allowed
        self.mode = mode
        self.parser = make_parser(parser, lenient)
        self.calls: dict[int, Call | PlanCall] = {}
        self.ended = False
        self.clean = False
        self.rejected = False
        self.text: list[str] = []

    # ---- the stream -------------------------------------------------------------------------
    def feed(self, text: str) -> None:
        """Model output of this turn; events reach tools at once in partial mode."""
        if text and not self.ended and not self.rejected:
            self._handle(self.parser.feed(text))

    def end(self, clean: bool, not_run: str = "not run: the turn was cut off before it ended") -> None:
        """The model's turn is over. Clean (stop token or stop string): complete calls run,
        external ones included. Otherwise (length, abort, a rejection, no tool round left):
        incomplete calls are cancelled, complete calls already running finish, and the
        others (external ones) never run: their result is an error saying `not_run`."""
        if self.ended:
            return
        self._handle(self.parser.close())
        self.ended, self.clean = True, clean and not self.rejected
        for call in list(self.calls.values()):
            if isinstance(call, PlanCall):
                call.on_turn_end(self.clean)
            elif call.result is not None or (call.ended and call.dispatched):
                continue  # done, or complete and running
            elif not call.ended:
                self.cancel_call(call, "the call was not complete when the turn ended")
            elif self.clean:  # a complete call held back for its side effects
                self.run_complete(call)
            else:
                self.cancel_call(call, not_run)

    def cancel(self) -> None:
        """The request is aborted: cancel every call, nothing more runs."""
        self.ended, self.clean = True, False
        for call in self.calls.values():
            if isinstance(call, PlanCall):
                call.cancel()
            elif call.result is None:
                self.cancel_call(call, "aborted")

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    @property
    def done(self) -> bool:
        """Ended (or cut off) and every call has its result."""
        return (self.ended or self.rejected) and all(c.result is not None for c in self.calls.values())

    def results(self) -> list[ToolResult]:
        """Results in call order (call once `done`)."""
        return [self.calls[i].result for i in sorted(self.calls)]

    def output_text(self) -> str:
        return "".join(self.text)

    # ---- events -----------------------------------------------------------------------------
    def _handle(self, events: list[Event]) -> None:
        now = time.perf_counter()
        for event in events:
            if isinstance(event, CallStart):
                self._on_start(event, now)
            elif isinstance(event, FieldDone):
                self._on_piece(event.index, ("field", event.key, event.value, now))
            elif isinstance(event, Line):
                self._on_piece(event.index, ("line", event.text, None, now))
            elif isinstance(event, CallEnd):
                self._on_end(event, now)
            else:
                self.text.append(event.delta)

    def _on_start(self, event: CallStart, now: float) -> None:
        call_id = f"{self.turn_id}-c{event.index}"
        if event.name == "plan" and "plan" not in self.allowed:
            self.calls[event.index] = PlanCall(self, event.index, call_id)
            return
        tool = self.allowed.get(event.name)
        call = Call(event.index, call_id, event.name, tool)
        self.calls[event.index] = call
        if tool is None:
            known = ", ".join(self.allowed) or "none"
            call.result = _error(call, f"unknown tool {event.name!r}; available tools: {known}")
        elif self._early(tool):
            self._dispatch(call, now)

    def _on_piece(self, index: int, piece: tuple[str, Any, Any, float]) -> None:
        call = self.calls.get(index)
        if isinstance(call, PlanCall):
            if piece[0] == "line":
                call.on_line(piece[1], self.mode == "partial")
        elif call is not None and call.result is None:
            if call.dispatched:
                self._send(call, piece)
            else:
                call.held.append(piece)

    def _on_end(self, event: CallEnd, now: float) -> None:
        call = self.calls.get(event.index)
        if isinstance(call, PlanCall):
            call.on_end()
            return
        if call is None or call.result is not None:
            return
        call.ended, call.ended_at = True, now
        error = self.check_args(call, event.args)
        if error:
            self.cancel_call(call, error)
        elif call.tool.side_effects != "external":
            self.run_complete(call, now)

    def check_args(self, call: Call, args: dict | str) -> str | None:
        """Arguments as a dict that fits the tool's schema, else the error for the model."""
        if isinstance(args, str) and call.tool.body_field and not args.lstrip().startswith("{"):
            args = {call.tool.body_field: args}
        if not isinstance(args, dict):
            return f"the arguments of {call.name} are not a valid JSON object: {args[:200]!r}"
        error = jsonschema.exceptions.best_match(self.executor.validator(call.tool).iter_errors(args))
        if error is not None:
            return f"invalid arguments for {call.name}: {error.message}"
        call.args = args
        return None

    # ---- dispatch ---------------------------------------------------------------------------
    def _early(self, tool: Tool) -> bool:
        return self.mode == "partial" and tool.side_effects != "external"

    def _dispatch(self, call: Call, now: float | None = None, owner: Any = None) -> None:
        """Bind the call to a worker and send what it has so far; its result goes to
        `owner` (a plan) or to the call itself."""
        if call.dispatched:
            return
        call.dispatched = True
        pool = self.executor.pool
        self.executor.track(self, call.call_id, owner or call)
        pool.open_call(CallInfo(call.call_id, call.name, self.request_id), now or time.perf_counter())
        for piece in call.held:
            self._send(call, piece)
        call.held.clear()

    def _send(self, call: Call, piece: tuple[str, Any, Any, float]) -> None:
        kind, a, b, sent_at = piece
        if kind == "field":
            self.executor.pool.send_field(call.call_id, a, b, sent_at)
        else:
            self.executor.pool.send_line(call.call_id, a, sent_at)

    def run_complete(self, call: Call, now: float | None = None, owner: Any = None) -> None:
        """Run a call whose arguments are complete and checked (`check_args`); its result goes
        to `owner` (a plan) or to the call itself."""
        self._dispatch(call, now, owner)
        self.executor.pool.finish(call.call_id, call.args)

    def cancel_call(self, call: Call, reason: str) -> None:
        """Drop the call (its worker, if it has one, cancels); its result is an error saying `reason`."""
        if call.dispatched:
            self.executor.untrack(call.call_id)
        call.result = _error(call, reason)

    def on_result(self, call: Call | Any, result: ToolResult) -> None:
        """A worker result for one of this turn's calls (or a plan's step)."""
        if isinstance(call, Call):
            call.result = result
            if result.rejected and not self.ended:
                self.rejected = True  # cut the turn off: the model should see the error now
        else:
            call.on_result(result)


def _error(call: Call, message: str) -> ToolResult:
    now = time.perf_counter()
    return ToolResult(
        call.call_id, call.name, f"Error: {message}", is_error=True, started_at=now, done_at=now
    )
