"""The tool driver: a request's tool rounds, held by every engine (embedded and remote).

An engine talks to its `ToolDriver` in plain data: the request's tool settings and the
constraint of each turn (`options`, `shown_specs`, `constraint`), new text of a request
(`feed`), the end of its turn (`end_turn`), and which results are ready (`poll`, which
returns the turns cut off by a rejection and the `Continuation`s whose results are all in).
The driver owns one `Turn` per model turn: its parser, the executor's partial or lazy
dispatch to the workers, and the tool-result turn rendered with the chat template, which the
engine appends after the text the model actually generated. It never sees an engine's
internals: KV, streams and finish reasons stay with the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from conveyor.config import ToolConfig
from conveyor.tools.base import ToolRegistry, ToolResult
from conveyor.tools.executor import ToolExecutor, Turn
from conveyor.tools.parsers import BODY_FORMATS, CallStart, default_format, make_parser

Form = Callable[[list[dict], "str | dict"], Any]  # (tool specs, tool choice) -> an engine's constraint

_PLACEHOLDER = "\x00CONVEYOR-ASSISTANT\x00"


@dataclass(frozen=True, slots=True)
class ToolOptions:
    """Per-request tool settings; None means the engine's default (ToolConfig)."""

    tools: tuple[str, ...] = ()  # server tools the model may call
    tool_choice: str | dict = "auto"  # auto | required | none | {"type": "function", ...}
    mode: str | None = None  # partial | lazy
    call_format: str | None = None  # parser: hermes | python | plan | auto
    max_tool_rounds: int | None = None
    constrained: bool | None = None
    client_tools: tuple[dict, ...] = ()  # OpenAI specs the caller runs: a call to one ends the request
    lenient_calls: bool = True  # JSON calls in fences and bare JSON count too, not only tags

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
    stop_text: str | None = None  # the stop token's text, if one ended the last turn
    timeline: list[Span] = field(default_factory=list)
    constraint_factory: Any = None  # turn number -> logits constraint, if the caller gave one
    final: str | None = None  # "tool_calls" | "length": the request ends once this turn's
    # results are in (they are reported, not continued)


def client_tool_key(options: ToolOptions, names: list[str | None]) -> str | None:
    """ "a+b" for calls of the client's tools a and b (in call order, once each); None for none."""
    client = options.client_names
    return "+".join(dict.fromkeys(n for n in names if n in client)) or None


class ToolTurnRenderer:
    """Renders tool results as the text that follows the model's own tokens, using the chat
    template: the end of the assistant turn (minus the stop token the model already emitted),
    then the tool-result turn and the next assistant header. Never re-renders earlier turns."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PLACEHOLDER}]
        self._base = tokenizer.apply_chat_template(base, tokenize=False)
        self._base_messages = base
        self._turn_tail = self._base[self._base.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]

    def render(self, contents: list[str], stop_text: str | None) -> str:
        """`stop_text`: the text of the stop token that ended the model's turn, if one did."""
        tool_messages = [{"role": "tool", "content": c} for c in contents]
        full = self.tokenizer.apply_chat_template(
            self._base_messages + tool_messages, tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(self._base):
            raise ValueError("the chat template renders earlier turns differently once tool results follow")
        tail = self._turn_tail
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text) :]
        return tail + full[len(self._base) :]


@dataclass(frozen=True, slots=True)
class Continuation:
    """A request whose tool results are all in: continue it with `text` (the tool-result turn
    to append), or, when `final` is set ("tool_calls" | "length"), end it with the results."""

    request_id: str
    results: list[ToolResult]
    text: str = ""
    final: str | None = None


class GrammarForm:
    """The embedded engine's constraint form: the xgrammar tool grammar, built on first use
    (the `prepare` threads and the engine's may ask for it first)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], compile_timeout_s: float = 0.0
    ) -> None:
        self._args = (tokenizer, vocab_size, sorted(stop_token_ids))
        self._compile_timeout_s = compile_timeout_s
        self._grammar: Any = None
        self._lock = threading.Lock()

    def __call__(self, specs: list[dict], choice: str | dict) -> Any:
        with self._lock:
            if self._grammar is None:
                from conveyor.tools.grammar import ToolGrammar  # xgrammar and torch stay off import

                self._grammar = ToolGrammar(*self._args, compile_timeout_s=self._compile_timeout_s)
        return self._grammar.constraint(specs, choice)


class ToolDriver:
    """Per-request tool sessions over one executor (see the module docstring). Without an
    executor (the engine serves no tools) it still settles client tool specs and constraints."""

    def __init__(
        self,
        config: ToolConfig,
        form: Form,
        executor: ToolExecutor | None = None,
        renderer: ToolTurnRenderer | None = None,
    ) -> None:
        self.config = config
        self.form = form
        self.executor = executor
        self.renderer = renderer
        self.default_rounds = config.max_tool_rounds
        self.sessions: dict[str, ToolSession] = {}
        self._by_turn: dict[int, str] = {}
        self._ready: list[str] = []  # turns whose results were all in when they ended

    @classmethod
    def start(cls, tools: Iterable[Any], config: ToolConfig, tokenizer: Any, form: Form) -> ToolDriver:
        """A driver for `tools`; when there are any, their workers start now (ready before the
        first request arrives)."""
        tools = list(tools)
        if not tools:
            return cls(config, form)
        from conveyor.tools.workers import WorkerPool

        registry = ToolRegistry(tools)
        renderer = ToolTurnRenderer(tokenizer)  # fails early if the chat template cannot render tool turns
        pool = WorkerPool(registry, config)
        pool.start()
        return cls(config, form, ToolExecutor(registry, pool, config.tool_mode), renderer)

    def close(self) -> None:
        """Stop the tool workers (no more tool calls are served after this)."""
        if self.executor is not None:
            self.executor.pool.close()

    # ---- a request's settings -------------------------------------------------------------
    def options(
        self,
        tools: list[str | dict],
        tool_choice: str | dict,
        mode: str | None,
        call_format: str | None,
        max_tool_rounds: int | None,
        lenient_calls: bool = True,
    ) -> ToolOptions | None:
        """The request's tool settings, or None when it offers no tools. A tool session (the
        engine runs calls) exists only when `tools` names engine tools; `client_tools` (OpenAI
        specs) are the caller's: a turn that calls one ends the request (finish "tool_calls")."""
        names = tuple(t for t in tools if isinstance(t, str))
        client = tuple(t for t in tools if isinstance(t, dict))
        if not (names or client) or tool_choice == "none":
            return None
        if names and self.executor is None:
            raise ValueError(
                f"this engine serves no tools (start it with ToolConfig(tools=...)); asked for {names}"
            )
        # a python or plan body is free text: no JSON call to constrain
        constrained = False if call_format in BODY_FORMATS else None
        return ToolOptions(
            names, tool_choice, mode, call_format, max_tool_rounds, constrained, client, lenient_calls
        )

    def shown_specs(self, tools: list[str | dict], call_format: str | None) -> list[dict] | None:
        """The tool specs the chat template lists: all of them, except that engine tools of a
        body format (python, plan) are described by the prompt instead."""
        return self.specs([t for t in tools if isinstance(t, dict) or call_format not in BODY_FORMATS])

    def specs(self, tools: list[str | dict]) -> list[dict] | None:
        """OpenAI specs of `tools` (engine tool names and client specs); ValueError for unknown names."""
        if not tools:
            return None
        if self.executor is None and any(isinstance(t, str) for t in tools):
            raise ValueError("this engine serves no tools (start it with ToolConfig(tools=...))")
        registry = self.executor.registry if self.executor else None
        unknown = [t for t in tools if isinstance(t, str) and t not in registry]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; this engine serves {registry.names}")
        return [registry.get(t).spec() if isinstance(t, str) else t for t in tools]

    def constraint(
        self, options: ToolOptions | None, turn: int, factory: Callable[[int], Any] | None = None
    ) -> Any:
        """The constraint of a turn, in the engine's form: from the request's factory, else the
        call format and schemas of the offered tools (`tool_choice` applies to the first turn;
        later ones are "auto", constrained only with ToolConfig.constrained). A body format
        (python, plan) is free text: never constrained."""
        if factory is not None:
            return factory(turn)
        if options is None or options.call_format in BODY_FORMATS:
            return None
        choice = options.tool_choice if turn == 0 else "auto"
        constrained = self.config.constrained if options.constrained is None else options.constrained
        if choice == "auto" and not constrained:
            return None
        return self.form([*(self.specs(list(options.tools)) or []), *options.client_tools], choice)

    def next_constraint(self, request_id: str) -> Any:
        """The constraint of the turn a request's session has just opened."""
        session = self.sessions[request_id]
        return self.constraint(session.options, session.rounds, session.constraint_factory)

    # ---- a request's rounds ---------------------------------------------------------------
    def attach(
        self, request_id: str, options: ToolOptions | None, factory: Callable[[int], Any] | None = None
    ) -> bool:
        """Open the request's first turn if it offers engine tools; returns whether it did
        (the engine then pauses the request at the end of each turn instead of finishing it)."""
        if options is None or not options.tools:
            return False
        session = ToolSession(options, self._open_turn(request_id, options, 0), constraint_factory=factory)
        self.sessions[request_id] = session
        return True

    def runs(self, request_id: str) -> bool:
        """Whether the driver runs tool rounds for the request."""
        return request_id in self.sessions

    def _open_turn(self, request_id: str, options: ToolOptions, number: int) -> Turn:
        parser = options.call_format or default_format(options.tools)
        turn = self.executor.open_turn(
            request_id,
            number,
            tools=options.tools,
            mode=options.mode,
            parser=parser,
            lenient=options.lenient_calls,
        )
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
        rounds = (
            self.default_rounds
            if session.options.max_tool_rounds is None
            else session.options.max_tool_rounds
        )
        last = session.rounds >= rounds
        session.turn.end(clean=not last, not_run=f"not run: the request reached max_tool_rounds ({rounds})")
        self._close_turn(session, stop_text)
        if not session.turn.has_calls:
            return "finish"
        client = session.options.client_names
        names = [getattr(c, "name", None) for c in session.turn.calls.values()]
        if any(n in client for n in names):
            if all(n in client for n in names):
                session.turn.cancel()  # nothing ran server-side: the request ends here
                return "tool_calls"
            session.final = "tool_calls"
        elif last:
            session.final = "length"
        if session.turn.done:  # partial execution finished every call while the model decoded
            self._ready.append(request_id)
        return "wait"

    def client_tool(self, request_id: str) -> str | None:
        """The client's tools the request's last turn called: the key of their expected time
        while the client runs them (`client_tool_key`); None without such calls."""
        session = self.sessions.get(request_id)
        if session is None:
            return None
        return client_tool_key(
            session.options, [getattr(c, "name", None) for c in session.turn.calls.values()]
        )

    @staticmethod
    def client_tool_in(options: ToolOptions, text: str) -> str | None:
        """`client_tool` of a request whose turns the driver did not run (it offers only the
        client's tools), read from its last turn's `text`."""
        parser = make_parser(options.call_format or default_format(options.tools), options.lenient_calls)
        events = [*parser.feed(text), *parser.close()]
        return client_tool_key(options, [e.name for e in events if isinstance(e, CallStart)])

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

    def poll(self, timeout_s: float) -> tuple[list[str], list[Continuation]]:
        """Worker results in. Returns the requests whose turn a rejected call cut off (the turn
        is ended here; the engine stops decoding it) and those whose results are all in."""
        if self.executor is None:
            return [], []
        if not self.sessions:  # still let the pool reap workers of cancelled calls
            self.executor.poll(0.0)
            return [], []
        cut, ready = self._poll(timeout_s)
        for request_id in cut:
            self.cut_turn(request_id)
        _, cut_ready = self._poll(0.0) if cut else ([], [])
        return cut, [self._continuation(request_id) for request_id in ready + cut_ready]

    def _poll(self, timeout_s: float) -> tuple[list[str], list[str]]:
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

    def _continuation(self, request_id: str) -> Continuation:
        final = self.sessions[request_id].final
        if final is not None:  # the results are reported and the request ends (`end_turn`)
            return Continuation(request_id, self.final_results(request_id), final=final)
        text, results = self.next_turn(request_id)
        return Continuation(request_id, results, text)

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

    def detach(self, request_id: str, cancel: bool) -> list[Span] | None:
        """The request is over: drop its session (cancelling its calls if `cancel`); returns
        its timeline, None if it had no session."""
        session = self.sessions.pop(request_id, None)
        if session is not None:
            if cancel:
                session.turn.cancel()
            self._by_turn.pop(id(session.turn), None)
            if not session.timeline or session.timeline[-1].kind != "decode":
                session.timeline.append(Span("decode", session.turn_started, time.perf_counter()))
        return session.timeline if session is not None else None

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self.sessions.values() if s.turn.ended or s.turn.rejected)

    # ---- engine-wide ----------------------------------------------------------------------
    def num_computing(self) -> int:
        """Workers computing a tool's code on this machine's cores now."""
        return self.executor.pool.num_computing() if self.executor is not None else 0

    def hand_off(self) -> None:
        """Let the workers just sent work take it (see `WorkerPool.hand_off`)."""
        if self.executor is not None:
            self.executor.pool.hand_off()
