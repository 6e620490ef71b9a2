"""The glue between the engine and the tool layer: one `Turn` per model turn of a request.

The engine feeds each request's new text to its turn. When the model's turn ends with
calls, the request waits for their results out of the batch with its KV kept
(AWAITING_TOOL); when they are in, the tool-result turn is rendered with the chat template
and appended after the tokens the model actually generated, and decoding continues. A call
rejected mid-stream (`on_field` raised ToolRejected) cuts the turn off at once. The tool layer
itself (`conveyor.tools`) sees only text and results, never the engine's internals.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools.base import ToolResult
from conveyor.tools.executor import ToolExecutor, Turn

_PLACEHOLDER = "\x00CONVEYOR-ASSISTANT\x00"


@dataclass(frozen=True, slots=True)
class ToolOptions:
    """Per-request tool settings; None means the engine's default (ToolConfig)."""

    tools: tuple[str, ...] = ()               # server tools the model may call
    tool_choice: str | dict = "auto"          # auto | required | none | {"type": "function", ...}
    mode: str | None = None                   # partial | lazy
    call_format: str | None = None            # parser: hermes | python | plan | auto
    max_tool_rounds: int | None = None
    constrained: bool | None = None
    client_tools: tuple[dict, ...] = ()      # OpenAI specs the caller runs: a call to one ends the request
    lenient_calls: bool = True                # JSON calls in fences and bare JSON count too, not only tags

    @property
    def client_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.client_tools}


@dataclass(frozen=True, slots=True)
class Span:
    """One stretch of a request's timeline (perf_counter seconds): decode, tool:<name>, wait."""

    kind: str
    start: float
    end: float


@dataclass(slots=True)
class ToolSession:
    """A request's tool state across its turns."""

    options: ToolOptions
    turn: Turn
    rounds: int = 0
    turn_started: float = field(default_factory=time.perf_counter)
    turn_ended: float = 0.0
    stop_text: str | None = None             # the stop token's text, if one ended the last turn
    timeline: list[Span] = field(default_factory=list)
    constraint_factory: Any = None            # turn number -> logits constraint, if the caller gave one
    final: str | None = None                  # "tool_calls" | "length": the request ends once this turn's
                                              # results are in (they are reported, not continued)


class ToolTurnRenderer:
    """Renders tool results as the text that follows the model's own tokens, using the chat
    template: the end of the assistant turn (minus the stop token the model already emitted),
    then the tool-result turn and the next assistant header. Never re-renders earlier turns."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PLACEHOLDER}]
        self._base = tokenizer.apply_chat_template(base, tokenize=False)
        self._base_messages = base
        self._turn_tail = self._base[self._base.index(_PLACEHOLDER) + len(_PLACEHOLDER):]

    def render(self, contents: list[str], stop_text: str | None) -> str:
        """`stop_text`: the text of the stop token that ended the model's turn, if one did."""
        tool_messages = [{"role": "tool", "content": c} for c in contents]
        full = self.tokenizer.apply_chat_template(self._base_messages + tool_messages, tokenize=False,
                                                  add_generation_prompt=True)
        if not full.startswith(self._base):
            raise ValueError("the chat template renders earlier turns differently once tool results follow")
        tail = self._turn_tail
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text):]
        return tail + full[len(self._base):]


class ToolLoop:
    """Per-request tool sessions over one executor (see the module docstring)."""

    def __init__(self, executor: ToolExecutor, renderer: ToolTurnRenderer, default_rounds: int,
                 default_parser: str | None = None) -> None:
        self.executor = executor
        self.renderer = renderer
        self.default_rounds = default_rounds
        self.default_parser = default_parser
        self.sessions: dict[str, ToolSession] = {}
        self._by_turn: dict[int, str] = {}
        self._ready: list[str] = []      # turns whose results were all in when they ended

    def attach(self, request_id: str, options: ToolOptions) -> ToolSession:
        session = ToolSession(options, self._open_turn(request_id, options, 0))
        self.sessions[request_id] = session
        return session

    def _open_turn(self, request_id: str, options: ToolOptions, number: int) -> Turn:
        parser = options.call_format or self.default_parser or ("auto" if "python" in options.tools else "hermes")
        turn = self.executor.open_turn(request_id, number, tools=options.tools, mode=options.mode, parser=parser,
                                       lenient=options.lenient_calls)
        self._by_turn[id(turn)] = request_id
        return turn

    def feed(self, request_id: str, text: str) -> None:
        session = self.sessions.get(request_id)
        if session is not None:
            session.turn.feed(text)

    def end_turn(self, request_id: str, stop_text: str | None) -> str:
        """The model's turn ended cleanly. Returns "finish" (no calls), "tool_calls" (only calls
        the caller runs) or "wait": the server-side calls run and their results come from
        `poll`; then the request continues, or, when `session.final` is set, ends with them
        reported (`final_results`). A call that ran is always reported, never dropped:
        - the turn also calls the caller's tools: the server's calls run, the request ends
          with "tool_calls" (the caller's calls are the caller's to run);
        - no tool round is left (`max_tool_rounds`): calls already running finish, the others
          do not start (their result says so), and the request ends with "length"."""
        session = self.sessions[request_id]
        rounds = self.default_rounds if session.options.max_tool_rounds is None else session.options.max_tool_rounds
        last = session.rounds >= rounds
        session.turn.end(clean=not last, not_run=f"not run: the request reached max_tool_rounds ({rounds})")
        self._close_turn(session, stop_text)
        if not session.turn.has_calls:
            return "finish"
        client = session.options.client_names
        names = [getattr(c, "name", None) for c in session.turn.calls.values()]
        if any(n in client for n in names):
            if all(n in client for n in names):
                session.turn.cancel()       # nothing ran server-side: the request ends here
                return "tool_calls"
            session.final = "tool_calls"
        elif last:
            session.final = "length"
        if session.turn.done:       # partial execution finished every call while the model decoded
            self._ready.append(request_id)
        return "wait"

    def cut_turn(self, request_id: str) -> None:
        """A call was rejected mid-stream: the turn ends now and its results go back."""
        session = self.sessions[request_id]
        session.turn.end(clean=False)
        self._close_turn(session, None)
        if session.turn.done:
            self._ready.append(request_id)

    def _close_turn(self, session: ToolSession, stop_text: str | None) -> None:
        session.turn_ended = time.perf_counter()
        session.stop_text = stop_text
        session.timeline.append(Span("decode", session.turn_started, session.turn_ended))

    def poll(self, timeout_s: float) -> tuple[list[str], list[str]]:
        """Worker results in. Returns (requests whose turn was rejected mid-stream and must
        stop decoding, requests whose results are all in and may resume)."""
        cut, ready, self._ready = [], self._ready, []
        for turn in self.executor.poll(0.0 if ready else timeout_s):
            request_id = self._by_turn.get(id(turn))
            session = self.sessions.get(request_id) if request_id else None
            if session is None or session.turn is not turn:
                continue
            if turn.rejected and not turn.ended:
                cut.append(request_id)
            elif turn.done and request_id not in ready:
                ready.append(request_id)
        return cut, ready

    def next_turn(self, request_id: str) -> tuple[str, list[ToolResult]]:
        """The text to append (tool-result turn) and the results; opens the next turn."""
        session = self.sessions[request_id]
        results = self._collect(session)
        now = session.timeline[-1].end
        text = self.renderer.render([r.content for r in results], session.stop_text)
        self._by_turn.pop(id(session.turn), None)
        session.rounds += 1
        session.turn = self._open_turn(request_id, session.options, session.rounds)
        session.turn_started = now
        return text, results

    def final_results(self, request_id: str) -> list[ToolResult]:
        """The results of a turn that ends its request (`session.final`): those of every call
        but the caller's own, in call order."""
        session = self.sessions[request_id]
        client = session.options.client_names
        return [r for r in self._collect(session) if r.name not in client]

    def _collect(self, session: ToolSession) -> list[ToolResult]:
        """The turn's results, their tool spans and the wait added to the timeline."""
        results = session.turn.results()
        for r in results:
            session.timeline.append(Span(f"tool:{r.name}", r.started_at, r.done_at))
        session.timeline.append(Span("wait", session.turn_ended, time.perf_counter()))
        return results

    def detach(self, request_id: str, cancel: bool) -> ToolSession | None:
        """The request is over: drop its session (cancelling its calls if `cancel`)."""
        session = self.sessions.pop(request_id, None)
        if session is not None:
            if cancel:
                session.turn.cancel()
            self._by_turn.pop(id(session.turn), None)
            if not session.timeline or session.timeline[-1].kind != "decode":
                session.timeline.append(Span("decode", session.turn_started, time.perf_counter()))
        return session

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self.sessions.values() if s.turn.ended or s.turn.rejected)
