"""The executor on scripted streams: partial vs lazy, side-effect rules, bad calls, plans."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.tools.base import Tool, ToolRegistry, ToolRejected, tool
from conveyor.tools.executor import ToolExecutor
from tests.unit.inline_pool import InlinePool


class Echo(Tool):
    name = "echo"
    side_effects = "none"
    parameters = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }

    def finish(self, args: dict[str, Any]) -> Any:
        return f"{args['a']}:{args.get('b')}"


class Send(Echo):
    name = "send"
    side_effects = "external"


class Strict(Echo):
    name = "strict"

    def on_field(self, key: str, value: Any) -> None:
        if key == "a" and value == "bad":
            raise ToolRejected("field 'a' may not be 'bad'")


@tool(side_effects="none")
def add(x: int, y: int) -> int:
    """Add two integers."""
    return x + y


@tool(side_effects="none")
def upper(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


def make(mode: str = "partial") -> tuple[ToolExecutor, InlinePool]:
    registry = ToolRegistry([Echo(), Send(), Strict(), add, upper])
    pool = InlinePool(registry)
    return ToolExecutor(registry, pool, mode), pool


CALL = '<tool_call>\n{"name": "echo", "arguments": {"a": "hi", "b": 2}}\n</tool_call>'


def run(text: str, mode: str, cuts: list[int] = (), parser: str = "hermes", tools=None):
    executor, pool = make(mode)
    turn = executor.open_turn("r", 0, parser=parser, tools=tools)
    last = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        turn.feed(text[last:cut])
        last = cut
        executor.poll()
    turn.end(clean=True)
    for _ in range(10):  # each poll delivers one layer of dependent plan steps
        executor.poll()
    return turn, pool


def test_partial_sends_fields_before_the_call_ends() -> None:
    executor, pool = make("partial")
    turn = executor.open_turn("r", 0)
    turn.feed(CALL[: CALL.index(', "b"')])
    assert [h[2] for h in pool.hooks("field")] == [("a", "hi")]
    assert pool.hooks("start") and not pool.hooks("finish")
    turn.feed(CALL[CALL.index(', "b"') :])
    executor.poll()
    turn.end(clean=True)
    assert turn.done and [r.content for r in turn.results()] == ["hi:2"]


def test_lazy_sends_nothing_before_the_call_ends() -> None:
    executor, pool = make("lazy")
    turn = executor.open_turn("r", 0)
    end = CALL.index("}}") + 1  # the arguments are closed, the call object not yet
    turn.feed(CALL[:end])
    assert pool.log == []
    turn.feed(CALL[end:])
    assert [h[1] for h in pool.log] == ["start", "field", "field", "finish"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(CALL) * 2), max_size=8))
def test_partial_and_lazy_give_the_same_results(cuts: list[int]) -> None:
    text = "Sure.\n" + CALL + "\n" + CALL.replace('"hi"', '"yo"')
    partial, _ = run(text, "partial", cuts)
    lazy, _ = run(text, "lazy", cuts)
    assert [r.content for r in partial.results()] == [r.content for r in lazy.results()] == ["hi:2", "yo:2"]


def test_external_tool_waits_for_a_clean_end_and_runs_once() -> None:
    executor, pool = make("partial")
    turn = executor.open_turn("r", 0)
    turn.feed(CALL.replace("echo", "send"))
    assert pool.log == []
    turn.end(clean=True)
    turn.end(clean=True)
    executor.poll()
    assert len(pool.hooks("finish")) == 1 and turn.results()[0].content == "hi:2"


def test_external_tool_never_runs_when_cut_or_aborted() -> None:
    for stop in ("cancel", "cut"):
        executor, pool = make("partial")
        turn = executor.open_turn("r", 0)
        turn.feed(CALL.replace("echo", "send"))
        turn.cancel() if stop == "cancel" else turn.end(clean=False)
        assert pool.log == [] and turn.done and turn.results()[0].is_error


def test_incomplete_call_is_cancelled_at_the_end() -> None:
    executor, pool = make("partial")
    turn = executor.open_turn("r", 0)
    turn.feed(CALL[: CALL.index(', "b"')])
    turn.end(clean=True)
    assert pool.hooks("cancel") and not pool.hooks("finish")
    assert turn.done and turn.results()[0].is_error


@pytest.mark.parametrize(
    "text, message",
    [
        ('<tool_call>\n{"name": "nope", "arguments": {"a": "x"}}\n</tool_call>', "unknown tool 'nope'"),
        ('<tool_call>\n{"name": "echo", "arguments": {"a": 1}}\n</tool_call>', "invalid arguments for echo"),
        ('<tool_call>\n{"name": "echo", "arguments": {"a": "x", "c": 1}}\n</tool_call>', "invalid arguments"),
        ('<tool_call>\n{"name": "echo", "arguments": {"a": "x"\n</tool_call>', "not a valid JSON object"),
    ],
)
def test_bad_calls_become_error_results_without_running(text: str, message: str) -> None:
    for mode in ("partial", "lazy"):
        turn, pool = run(text, mode)
        assert turn.done and turn.results()[0].is_error and message in turn.results()[0].content
        assert not pool.hooks("finish")


def test_rejected_field_cuts_the_turn() -> None:
    executor, _ = make("partial")
    turn = executor.open_turn("r", 0)
    turn.feed('<tool_call>\n{"name": "strict", "arguments": {"a": "bad", "b": 1')
    changed = executor.poll()
    assert turn in changed and turn.rejected and not turn.ended
    turn.feed("}}\n</tool_call>")  # ignored: the turn is cut off
    turn.end(clean=False)
    assert turn.done and turn.results()[0].rejected
    assert "may not be 'bad'" in turn.results()[0].content


def test_tools_are_limited_to_the_offered_ones() -> None:
    turn, _ = run(CALL, "partial", tools=["add"])
    assert "unknown tool 'echo'" in turn.results()[0].content
    with pytest.raises(ValueError, match="unknown tools"):
        make()[0].open_turn("r", 0, tools=["missing"])


PLAN = '1. add(2, 3)\n2. upper("x")\n3. add($1, 10)\n4. upper("$2 and $3")\n5. join()\n<END_OF_PLAN>'


@pytest.mark.parametrize("mode", ["partial", "lazy"])
def test_plan_steps_run_in_dependency_order(mode: str) -> None:
    turn, _ = run(PLAN, mode, parser="plan")
    assert turn.done
    assert turn.results()[0].content == "$1 = 5\n$2 = X\n$3 = 15\n$4 = X AND 15"


def test_plan_steps_start_before_the_plan_ends_in_partial_mode() -> None:
    executor, pool = make("partial")
    turn = executor.open_turn("r", 0, parser="plan")
    turn.feed(PLAN[: PLAN.index("3.")])
    executor.poll()
    assert len(pool.hooks("finish")) == 2  # steps 1 and 2 ran while step 3 was being decoded
    turn.feed(PLAN[PLAN.index("3.") :])
    for _ in range(3):
        executor.poll()
    turn.end(clean=True)
    assert turn.done and not turn.results()[0].is_error


def test_plan_step_errors_propagate() -> None:
    turn, _ = run("1. add(1)\n2. add($1, 2)\n3. nope(1)\n<END_OF_PLAN>", "partial", parser="plan")
    content = turn.results()[0].content
    assert turn.results()[0].is_error
    assert "$2 = Error: step 2 depends on step(s) [1]" in content and "unknown tool 'nope'" in content
