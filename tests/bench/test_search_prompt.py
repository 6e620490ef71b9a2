"""The search case's worked exchange is a well-formed call of the tool the case offers."""

from __future__ import annotations

from conveyor.bench.workloads.search import SHOT
from conveyor.tools.parsers import CallStart, FieldDone, make_parser


def test_the_worked_example_is_a_search_call_with_a_query():
    parser = make_parser("hermes")
    call = next(m["content"] for m in SHOT if m["role"] == "assistant" and "<tool_call>" in m["content"])
    events = list(parser.feed(call)) + list(parser.close())
    assert [e.name for e in events if isinstance(e, CallStart)] == ["search"]
    fields = {e.key: e.value for e in events if isinstance(e, FieldDone)}
    assert fields["query"] == "gzip open read" and fields["k"] == 3
    assert [m["role"] for m in SHOT] == ["user", "assistant", "tool", "assistant"]
