"""The Responses API's pure parts: the bounded store, input items as chat messages, and the
output items built from call-stream deltas (any split of the text gives the same items)."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.server.calls import CallStream
from conveyor.server.response_items import OutputItems, items_to_messages
from conveyor.server.response_store import ResponseStore
from conveyor.server.responses_protocol import ITEMS
from conveyor.tools.base import ToolResult


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _response(i: int, size: int = 10) -> dict:
    return {"id": f"r{i}", "output": "x" * size}


def test_store_bounds_count_and_drops_least_recent():
    store = ResponseStore(max_entries=2, max_bytes=10_000, ttl_s=60)
    for i in range(2):
        assert store.put(f"r{i}", _response(i), [])
    assert store.get("r0") is not None  # r0 is now the most recent
    store.put("r2", _response(2), [])
    assert store.get("r1") is None and store.get("r0") is not None and len(store) == 2


def test_store_bounds_bytes_and_accounts_them():
    one = len(json.dumps(_response(0, 100))) + len(json.dumps([{"role": "user", "content": "hi"}]))
    store = ResponseStore(max_entries=100, max_bytes=2 * one + 1, ttl_s=60)
    for i in range(3):
        assert store.put(f"r{i}", _response(i, 100), [{"role": "user", "content": "hi"}])
    assert len(store) == 2 and store.num_bytes == 2 * one and store.get("r0") is None
    assert not store.put("big", _response(9, 3 * one), [])  # larger than the bound alone: not stored
    assert store.get("big") is None and store.num_bytes == 2 * one
    store.pop("r1")
    store.pop("r2")
    assert store.num_bytes == 0 and len(store) == 0


def test_store_expires():
    clock = Clock()
    store = ResponseStore(max_entries=10, max_bytes=10_000, ttl_s=5, clock=clock)
    store.put("r0", _response(0), [])
    clock.now = 4.9
    assert store.get("r0") is not None
    clock.now = 5.0
    assert store.get("r0") is None and store.num_bytes == 0


def test_store_off():
    store = ResponseStore(max_entries=0, max_bytes=10_000, ttl_s=5)
    assert not store.put("r0", _response(0), []) and store.get("r0") is None


def test_items_group_calls_into_turns():
    items = ITEMS.validate_python(
        [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me see."}],
            },
            {"type": "mcp_call", "id": "s1", "name": "lookup", "arguments": '{"key": "a"}', "output": "A"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "22C"},
            {"type": "message", "role": "assistant", "content": "Done."},
        ]
    )
    assert items_to_messages(items) == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Let me see.",
            "tool_calls": [
                {"id": "s1", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "a"}'}},
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "s1", "content": "A"},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
        {"role": "assistant", "content": "Done."},
    ]


TURN = 'Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"key": "k1"}}\n</tool_call>'
ANSWER = "The value is A."


def _build(pieces: list[str], answer_pieces: list[str]) -> OutputItems:
    calls = CallStream("r", {"lookup"}, parse=True, client_tools=set())
    out = OutputItems("r")
    for piece in pieces:
        out.deltas(calls.feed(piece))
    deltas, server = calls.end_turn()
    out.deltas(deltas)
    out.results(zip(server, [ToolResult("x", "lookup", "A")]))
    for piece in answer_pieces:
        out.deltas(calls.feed(piece))
    out.deltas(calls.end_turn()[0])
    out.close()
    return out


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=8), st.lists(st.integers(0, 20), max_size=4))
def test_any_split_gives_the_same_items(cuts, answer_cuts):
    whole = _build([TURN], [ANSWER])
    split = _build(_split(TURN, cuts), _split(ANSWER, answer_cuts))
    assert split.items == whole.items
    assert [i["type"] for i in whole.items] == ["message", "mcp_call", "message"]
    assert whole.items[1]["output"] == "A" and json.loads(whole.items[1]["arguments"]) == {"key": "k1"}
    assert whole.messages() == [
        {
            "role": "assistant",
            "content": "Let me look.\n",
            "tool_calls": [
                {
                    "id": whole.items[1]["id"],
                    "type": "function",
                    "function": {"name": "lookup", "arguments": whole.items[1]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": whole.items[1]["id"], "content": "A"},
        {"role": "assistant", "content": ANSWER},
    ]


def test_a_cut_call_is_incomplete():
    calls = CallStream("r", set(), parse=True, client_tools={"get_weather"})
    out = OutputItems("r")
    events = out.deltas(calls.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'))
    events += out.close()
    [item] = out.items
    assert item["type"] == "function_call" and item["status"] == "incomplete"
    assert [e["type"] for e in events][-1] == "response.output_item.done"
