"""A response's output items, built from the call stream's deltas, with the typed events
that build them (the Responses API's streaming protocol). Pure Python.

Text goes into `message` items (one per run of text; whitespace alone before a call or the
end opens none), a client tool's call becomes a `function_call` item, and a server tool's
call an `mcp_call` item (server_label "conveyor") that is done once its result is in, the
way OpenAI shows the calls its hosted tools make. Each method returns the events, as dicts
without `sequence_number` (the stream numbers them).

The other way, `items_to_messages` turns input items (ours sent back included) into the chat
messages the engine renders.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

from conveyor.server.calls import Delta, StreamedCall
from conveyor.server.responses_protocol import (
    ITEMS,
    SERVER_LABEL,
    FunctionCallItem,
    FunctionCallOutputItem,
    ServerCallItem,
    joined,
)

Event = dict[str, Any]


class OutputItems:
    """The output of one response under construction (see the module docstring)."""

    def __init__(self, response_id: str) -> None:
        self.response_id = response_id
        self.items: list[dict[str, Any]] = []
        self._message: int | None = None  # the open message item's index
        self._blank = ""  # whitespace not yet shown: it opens no message on its own
        self._calls: dict[int, int] = {}  # StreamedCall.index -> item index
        self._shown: dict[int, int] = {}  # StreamedCall.index -> argument characters shown
        self._open: set[int] = set()  # item indices not done yet
        self._turn_starts: list[int] = [0]  # item indices where a model turn begins

    def deltas(self, deltas: Iterable[Delta]) -> list[Event]:
        """Text and call pieces of the current model turn."""
        events: list[Event] = []
        for d in deltas:
            if d.call is None:
                events += self._text(d.content)
                continue
            if d.first:
                events += self._start(d.call)
            events += self._arguments(d.call, d.arguments)
        return events

    def results(self, pairs: Iterable[tuple[StreamedCall, Any]]) -> list[Event]:
        """A server tool round is over: its calls are done with their results (ToolResult);
        the next text or call belongs to the model's next turn."""
        events = self._close_message()
        for call, result in pairs:
            index = self._calls[call.index]
            item = self.items[index]
            item.update(output=result.content, status="failed" if result.is_error else "completed")
            if result.is_error:
                item["error"] = {"type": "mcp_tool_execution_error", "content": result.content}
            kind = "failed" if result.is_error else "completed"
            events.append({"type": f"response.mcp_call.{kind}", "item_id": item["id"], "output_index": index})
            events += self._done(index)
        self._turn_starts.append(len(self.items))
        return events

    def close(self) -> list[Event]:
        """The response is over: the open message is done; calls still open (cut short, or a
        server call without its result) are done as "incomplete"."""
        events = self._close_message()
        for index in sorted(self._open):
            self.items[index]["status"] = "incomplete"
            events += self._done(index)
        return events

    def messages(self) -> list[dict[str, Any]]:
        """The output as chat messages, turn by turn (what `previous_response_id` continues)."""
        bounds = [*self._turn_starts, len(self.items)]
        out: list[dict[str, Any]] = []
        for start, end in itertools.pairwise(bounds):
            out += items_to_messages(ITEMS.validate_python(self.items[start:end]))
        return out

    @property
    def text(self) -> str:
        return "".join(p["text"] for item in self.items if item["type"] == "message" for p in item["content"])

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        events: list[Event] = []
        if self._message is None:
            if not text.strip():
                self._blank += text
                return []
            text, self._blank = self._blank + text, ""
            events = self._open_message()
        index = self._message
        part = self.items[index]["content"][0]
        part["text"] += text
        events.append(
            _part_event("response.output_text.delta", self.items[index], index, delta=text, logprobs=[])
        )
        return events

    def _open_message(self) -> list[Event]:
        item_id = f"msg_{self.response_id}_{len(self.items)}"
        index = self._add(
            {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress", "content": []}
        )
        self._message = index
        item = self.items[index]
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [_added(item, index), _part_event("response.content_part.added", item, index, part=part)]
        item["content"].append(part)
        return events

    def _close_message(self) -> list[Event]:
        self._blank = ""
        index, self._message = self._message, None
        if index is None:
            return []
        item = self.items[index]
        part = item["content"][0]
        item["status"] = "completed"
        return [
            _part_event("response.output_text.done", item, index, text=part["text"], logprobs=[]),
            _part_event("response.content_part.done", item, index, part=copy.deepcopy(part)),
            *self._done(index),
        ]

    def _start(self, call: StreamedCall) -> list[Event]:
        events = self._close_message()
        if call.server:
            item = {"type": "mcp_call", "id": call.id, "server_label": SERVER_LABEL, "name": call.name}
            item.update(arguments="", output=None, error=None, status="in_progress")
        else:
            item = {"type": "function_call", "id": f"fc_{call.id}", "call_id": call.id, "name": call.name}
            item.update(arguments="", status="in_progress")
        index = self._add(item)
        self._calls[call.index], self._shown[call.index] = index, 0
        events.append(_added(item, index))
        if call.server:
            events.append(
                {"type": "response.mcp_call.in_progress", "item_id": item["id"], "output_index": index}
            )
        return events

    def _arguments(self, call: StreamedCall, fragment: str) -> list[Event]:
        """An argument fragment; once the call's arguments are complete, their done event (and
        the item's, for a client call: a server call waits for its result)."""
        index = self._calls[call.index]
        item = self.items[index]
        kind = "mcp_call" if call.server else "function_call"
        events: list[Event] = []
        if fragment:
            item["arguments"] += fragment
            self._shown[call.index] += len(fragment)
            events.append({"type": f"response.{kind}_arguments.delta", **_at(item, index), "delta": fragment})
        if call.ended and self._shown[call.index] == sum(map(len, call.arguments)):
            self._shown[call.index] = -1  # done: never again
            done = {
                "type": f"response.{kind}_arguments.done",
                **_at(item, index),
                "arguments": item["arguments"],
            }
            events.append(done if call.server else {**done, "name": call.name})
            if not call.server:
                item["status"] = "completed"
                events += self._done(index)
        return events

    def _add(self, item: dict[str, Any]) -> int:
        self.items.append(item)
        self._open.add(len(self.items) - 1)
        return len(self.items) - 1

    def _done(self, index: int) -> list[Event]:
        self._open.discard(index)
        return [
            {
                "type": "response.output_item.done",
                "output_index": index,
                "item": copy.deepcopy(self.items[index]),
            }
        ]


def _added(item: dict[str, Any], index: int) -> Event:
    return {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}


def _at(item: dict[str, Any], index: int) -> dict[str, Any]:
    return {"item_id": item["id"], "output_index": index}


def _part_event(kind: str, item: dict[str, Any], index: int, **fields: Any) -> Event:
    return {"type": kind, **_at(item, index), "content_index": 0, **fields}


def items_to_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages (the shape `protocol.Message` takes, arguments as strings).

    Calls join the assistant message before them (one model turn: its text, then its calls);
    a server call's output becomes a tool message after that turn's calls. Two server calls
    with nothing between them read as one turn.
    """
    messages: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []  # server call outputs, after the turn's calls
    for item in items:
        if isinstance(item, FunctionCallItem | ServerCallItem):
            call_id = item.call_id if isinstance(item, FunctionCallItem) else item.id
            _turn(messages).append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
            )
            if isinstance(item, ServerCallItem):
                results.append({"role": "tool", "tool_call_id": item.id, "content": item.output or ""})
            continue
        messages += results
        results = []
        if isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": joined(item.output)})
        else:
            messages.append({"role": item.role, "content": item.text})
    return messages + results


def _turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool_calls list of the current assistant turn (a new assistant message if there is none)."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": None}
        messages.append(last)
    return last.setdefault("tool_calls", [])
