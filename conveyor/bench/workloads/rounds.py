"""One round of one case: drive the engine, record the stream, and (for lazy rounds) work
out the ideal saving from the timeline (`timing.py`).

The ideal's events are stamped with the engine step that sampled the token completing each
field or line (the text of the turn's tokens so far, decoded whole, is fed to a fresh parser),
not with when the engine's text reached the benchmark: a delay inside the engine (a
detokenizer holding text back) would otherwise shrink the ideal together with the gain."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from conveyor.bench.workloads.base import Case
from conveyor.bench.workloads.timing import CallTiming, TurnTiming, ideal_saving_s
from conveyor.tools.base import ToolRejected, ToolResult
from conveyor.tools.driver import Span
from conveyor.tools.parsers import CallStart, FieldDone, Line, make_parser, parse_step


@dataclass(slots=True)
class Round:
    """What one run of a case produced; times are seconds from the request's arrival."""

    case: str
    tool_mode: str
    latency_s: float
    text: str
    results: list[ToolResult]
    timeline: list[Span]
    turns: list[list[int]]  # output token ids, per model turn
    token_times: list[list[float]] = field(default_factory=lambda: [[]])  # when each token's step returned
    deltas: list[tuple[float, int, str]] = field(default_factory=list)  # (time, turn, text)
    results_by_turn: dict[int, list[ToolResult]] = field(default_factory=dict)
    correct: bool = False
    ideal_saving_s: float = 0.0
    ideal_by_text_s: float = 0.0  # the same, events timed by when the engine's text arrived (the old way)
    loadavg_1m: float = 0.0  # the machine's load when the round ended (other work disturbs timings)

    @property
    def valid_call(self) -> bool:
        """The model called a tool, and one call ran without an error (or was rejected on purpose)."""
        return any(not r.is_error or r.rejected for r in self.results)


def run_case(engine: Any, case: Case, tool_mode: str, params: dict, constraint: Any = None) -> Round:
    """Run `case` once to completion on `engine` (no other requests in flight)."""
    start = time.perf_counter()
    rid = engine.add_request(
        list(case.messages),
        params,
        tools=list(case.tools),
        tool_choice=case.tool_choice,
        tool_mode=tool_mode,
        call_format=case.call_format,
        constraint=constraint,
        max_tool_rounds=case.max_tool_rounds,
    )
    run = Round(case.name, tool_mode, 0.0, "", [], [], [[]])
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id != rid:
                continue
            now = time.perf_counter() - start
            if out.tool_results:
                run.results_by_turn[len(run.turns) - 1] = list(out.tool_results)
                run.results += out.tool_results
                run.turns.append([])
                run.token_times.append([])
            run.turns[-1] += out.new_token_ids
            run.token_times[-1] += [now] * len(out.new_token_ids)
            if out.new_text:
                run.deltas.append((now, len(run.turns) - 1, out.new_text))
            if out.finished:
                run.latency_s = now
                run.timeline = [Span(s.kind, s.start - start, s.end - start) for s in out.timeline or []]
    run.text = "".join(d[2] for d in run.deltas if d[1] == len(run.turns) - 1)
    run.results = [_relative(r, start) for r in run.results]
    run.results_by_turn = {n: [_relative(r, start) for r in rs] for n, rs in run.results_by_turn.items()}
    run.correct = case.check(run.results, run.text)
    run.loadavg_1m = os.getloadavg()[0]
    return run


def _relative(result: ToolResult, start: float) -> ToolResult:
    from dataclasses import replace

    return replace(result, started_at=result.started_at - start, done_at=result.done_at - start)


def lazy_turns(
    run: Round, call_format: str, tools: dict[str, Any], tokenizer: Any = None, stop: tuple[str, ...] = ()
) -> list[TurnTiming]:
    """The turns of a lazy round that ended with calls, as TurnTimings. With `tokenizer` (and
    token ids in the round) events are timed by the step that sampled their last token; else
    (remote rounds carry no token ids) by when their text arrived."""
    decodes = [s for s in run.timeline if s.kind == "decode"]
    turns = []
    for number, results in sorted(run.results_by_turn.items()):
        if number >= len(decodes):
            break
        if tokenizer is not None and run.turns[number]:
            events = token_events(call_format, run.turns[number], run.token_times[number], tokenizer, stop)
        else:
            events = _timed_events(call_format, [(t, text) for t, n, text in run.deltas if n == number])
        decode_end = decodes[number].end
        calls, reject_s = _call_timings(events, results, decode_end, tools)
        turns.append(TurnTiming(decode_end, tuple(calls), reject_s))
    return turns


def ideal_of(
    run: Round, call_format: str, tools: dict[str, Any], tokenizer: Any = None, stop: tuple[str, ...] = ()
) -> float:
    return sum(ideal_saving_s(t) for t in lazy_turns(run, call_format, tools, tokenizer, stop))


def token_events(
    call_format: str, tokens: list[int], times: list[float], tokenizer: Any, stop: tuple[str, ...] = ()
) -> list[tuple[float, Any]]:
    """The parser's events for a turn's tokens, each stamped with the time of the step that
    sampled the token whose text completed it: the text of tokens[:k], whole characters only and
    cut at a stop string (as the engine's detokenizer cuts it), is fed as soon as token k exists."""
    parser = make_parser(call_format)
    events: list[tuple[float, Any]] = []
    fed = ""
    for k, at in enumerate(times, 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
        if cut == len(text) and (text.endswith("\ufffd") or len(text) <= len(fed)):
            continue
        events += [(at, e) for e in parser.feed(text[len(fed) : cut])]
        fed = text[:cut]
        if cut < len(text):
            break  # a stop string: the engine's text ends here
    return events + [(times[-1] if times else 0.0, e) for e in parser.close()]


def _timed_events(call_format: str, deltas: list[tuple[float, str]]) -> list[tuple[float, Any]]:
    """The parser's events for a turn's text, each stamped with the time its text arrived."""
    parser = make_parser(call_format)
    events = [(t, e) for t, text in deltas for e in parser.feed(text)]
    last = deltas[-1][0] if deltas else 0.0
    return events + [(last, e) for e in parser.close()]


def _call_timings(
    events: list[tuple[float, Any]], results: list[ToolResult], decode_end: float, tools: dict[str, Any]
) -> tuple[list[CallTiming], float | None]:
    """Per call (per plan step for plans): its first field or line, and its lazy run."""
    calls: list[CallTiming] = []
    reject_s = None
    for index, result in enumerate(results):
        mine = [
            (t, e) for t, e in events if getattr(e, "index", None) == index and not isinstance(e, CallStart)
        ]
        pieces = [(t, e) for t, e in mine if isinstance(e, (FieldDone, Line))]
        if result.name == "plan":  # steps start at the plan's end in lazy mode
            steps = [t for t, e in pieces if (s := parse_step(e.text)) is not None and s.tool != "join"]
            calls += [CallTiming(t, decode_end, result.done_at) for t in steps]
            continue
        first = pieces[0][0] if pieces else (mine[0][0] if mine else decode_end)
        calls.append(CallTiming(first, result.started_at, result.done_at))
        if result.rejected and reject_s is None:
            reject_s = _reject_time(pieces, tools.get(result.name))
    return calls, reject_s


def _reject_time(pieces: list[tuple[float, Any]], tool: Any) -> float | None:
    """When the field the tool rejects was decoded (its hooks replayed in this process)."""
    if tool is None:
        return None
    fresh = tool.for_call()
    for t, event in pieces:
        try:
            if isinstance(event, FieldDone):
                fresh.on_field(event.key, event.value)
        except ToolRejected:
            return t
    return None
