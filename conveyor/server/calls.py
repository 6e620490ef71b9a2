"""From the model's text to OpenAI chat deltas: content, and tool calls streamed the way
OpenAI streams them (index; id, type and name first; then argument fragments).

A client's calls go out as `tool_calls`; the server's own calls as `server_tool_calls`, an
extension field standard clients ignore (the `openai` SDK keeps it as an extra field). Each
list is indexed from 0 on its own, so that clients which merge entries by index (the SDK's
stream helpers, LangChain) see contiguous indices.

The engine's outputs carry text; a call parser (`conveyor.tools.parsers`) turns it into
events. Text goes out as `content`; a call's CallStart opens a `tool_calls` entry, each
FieldDone adds a fragment of its JSON arguments (`{"key": value`, `, "key": value`), and
CallEnd closes the object, so the fragments join into the call's arguments. Pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools.parsers import CallEnd, CallStart, FieldDone, Text, make_parser


@dataclass(slots=True)
class StreamedCall:
    """One call as the client sees it; `server` calls are run by Conveyor itself. `index`
    counts the calls of its kind (client or server) in the request."""

    index: int
    id: str
    name: str
    server: bool
    arguments: list[str] = field(default_factory=list)
    num_fields: int = 0
    ended: bool = False

    def as_tool_call(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


@dataclass(slots=True)
class Delta:
    """One piece of a chat delta: `content` text, or a tool-call entry (`call`, first piece
    carries id and name) with an `arguments` fragment."""

    content: str = ""
    call: StreamedCall | None = None
    first: bool = False
    arguments: str = ""

    def as_dict(self) -> dict[str, Any]:
        if self.call is None:
            return {"content": self.content}
        entry: dict[str, Any] = {"index": self.call.index, "function": {"arguments": self.arguments}}
        if self.first:
            entry.update(id=self.call.id, type="function")
            entry["function"]["name"] = self.call.name
        return {"server_tool_calls" if self.call.server else "tool_calls": [entry]}


class CallStream:
    """Turns a request's text into Deltas across its turns (one parser per model turn).

    `client_tools`: names the client runs (their calls come back as `tool_calls`).
    `server_tools`: names run by the server; when there are any, the engine runs the turn's
    other calls too, or answers them with an error result (a name nobody offered), so they
    are shown as server calls, each followed by its result. Without server tools, a call of
    a name nobody offered is no call: it goes out as text. `parse=False` passes text through
    (no tools offered); `lenient` also reads JSON calls in fences and bare JSON (`make_parser`).
    """

    def __init__(
        self,
        request_id: str,
        server_tools: set[str],
        parse: bool,
        parser: str = "hermes",
        client_tools: set[str] | None = None,
        lenient: bool = True,
    ) -> None:
        self.request_id = request_id
        self.server_tools = server_tools
        self.client_tools = client_tools
        self.parse = parse
        self.kind = parser
        self.lenient = lenient
        self.calls: list[StreamedCall] = []
        self._turn: dict[int, StreamedCall] = {}  # parser index -> call, this turn
        self._unoffered: dict[int, str] = {}  # parser index -> name, calls shown as text
        self._parser = make_parser(parser, lenient) if parse else None

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self._parser is None:
            return [Delta(content=text)]
        return self._deltas(self._parser.feed(text))

    def end_turn(self) -> tuple[list[Delta], list[StreamedCall]]:
        """The model's turn ended: flush the parser; returns the last deltas and the turn's
        server calls (in order, to pair with the results the engine reports); opens the next turn."""
        if self._parser is None:
            return [], []
        deltas = self._deltas(self._parser.close())
        server = [c for _, c in sorted(self._turn.items()) if c.server]
        self._parser, self._turn, self._unoffered = make_parser(self.kind, self.lenient), {}, {}
        return deltas, server

    @property
    def client_calls(self) -> list[StreamedCall]:
        return [c for c in self.calls if not c.server]

    def _deltas(self, events: list[Any]) -> list[Delta]:
        out: list[Delta] = []
        for event in events:
            if isinstance(event, Text):
                if event.delta:
                    out.append(Delta(content=event.delta))
            elif isinstance(event, CallStart):
                server = self._is_server(event.name)
                if server is None:
                    self._unoffered[event.index] = event.name
                    continue
                index = sum(1 for c in self.calls if c.server == server)
                call = StreamedCall(index, f"call_{self.request_id}_{len(self.calls)}", event.name, server)
                self.calls.append(call)
                self._turn[event.index] = call
                out.append(self._piece(call, "", first=True))
            elif isinstance(event, CallEnd) and event.index in self._unoffered:
                out.append(Delta(content=_as_text(self._unoffered.pop(event.index), event.args)))
            elif isinstance(event, FieldDone) and event.index in self._turn:
                call = self._turn[event.index]
                lead = "{" if call.num_fields == 0 else ", "
                call.num_fields += 1
                out.append(self._piece(call, f"{lead}{json.dumps(event.key)}: {json.dumps(event.value)}"))
            elif isinstance(event, CallEnd) and event.index in self._turn:
                out.append(
                    self._piece(self._turn[event.index], _closing(self._turn[event.index], event.args))
                )
        return out

    def _is_server(self, name: str) -> bool | None:
        """Whether a call is the server's (True), the client's (False) or nobody's (None)."""
        if self.client_tools is None:  # no client names given: every non-server call is the client's
            return name in self.server_tools
        if name in self.client_tools:
            return False
        return True if self.server_tools else None

    @staticmethod
    def _piece(call: StreamedCall, fragment: str, first: bool = False) -> Delta:
        call.arguments.append(fragment)
        if not first and not fragment:
            return Delta(content="")
        return Delta(call=call, first=first, arguments=fragment)


def _closing(call: StreamedCall, args: dict | str) -> str:
    """The last fragment of a call's arguments."""
    call.ended = True
    if call.num_fields:
        return "}"
    if isinstance(args, dict):
        return json.dumps(args)
    return json.dumps({"code": args}) if call.name == "python" else args


def _as_text(name: str, args: dict | str) -> str:
    """A call of a tool nobody offered, as the text it was (re-serialized)."""
    return json.dumps({"name": name, "arguments": args}) if isinstance(args, dict) else str(args)


def merge(deltas: list[Delta]) -> list[dict[str, Any]]:
    """Deltas as OpenAI delta dicts, adjacent content pieces joined, empty pieces dropped."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.call is None and not d.content:
            continue
        item = d.as_dict()
        if d.call is None and out and "content" in out[-1]:
            out[-1]["content"] += d.content
        else:
            out.append(item)
    return out
