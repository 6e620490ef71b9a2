"""Hermes/Qwen JSON calls: `<tool_call>{...}</tool_call>`, a ```json (or ```tool_call)
fence, or bare JSON.

A call object is `{"name": ..., "arguments": {...}}` ("parameters" is accepted for
"arguments"; a JSON-encoded arguments string is decoded at the end). Each top-level
argument yields `FieldDone` the moment its value closes. A block may also hold a JSON list
of call objects: each element is a call of its own (CallStart ... CallEnd per element).
Fence language tags and tags match regardless of case (```JSON, ```Json).

Where a call is recognised: after `<tool_call>` the block is a call as soon as its name
is known. A strict parser (`lenient=False`) recognises calls only there: prose that quotes
JSON stays prose. A lenient one (the default: small models often skip the tags) also reads
calls in fences and bare JSON: a fence, or a `{` or `[` that is the first non-blank
character of a line, is a call only once both the (first) object's "name" value and its "arguments" key have been
seen. Until then the text is held back, and it goes out as `Text` if it turns out not to be
a call. In a list whose first element was a call, each later element is a call as soon as
its name is known; later elements that are no calls are skipped.

Malformed JSON never raises: a call whose `CallStart` went out ends with
`CallEnd(index, raw_json_text)` (its text from its `{`) at the closing tag or fence (at
`close()` for bare JSON); a block that never got a name is emitted as `Text`; in a list,
malformed text outside any named element is dropped up to the block's end.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.tools.parsers.base import MarkerParser, fold
from conveyor.tools.parsers.events import CallEnd, CallStart, FieldDone
from conveyor.tools.parsers.jsonscan import JsonScanner, Value

HERMES_MARKERS = ("<tool_call>", "```json\n", "```tool_call\n")
TAG_MARKERS = ("<tool_call>",)  # a strict parser's only opener
_CLOSERS = {"<tool_call>": "</tool_call>", "```json\n": "```", "```tool_call\n": "```", "": ""}
_ARG_KEYS = ("arguments", "parameters")


class HermesParser(MarkerParser):
    """Streaming parser for JSON tool calls (see the module docstring)."""

    MARKERS: tuple[str, ...] = HERMES_MARKERS
    STRICT_MARKERS: tuple[str, ...] = TAG_MARKERS

    __slots__ = (
        "_depth",
        "_has_args",
        "_index",
        "_json_at",
        "_lenient",
        "_mode",
        "_name",
        "_num_block_calls",
        "_opener",
        "_pending",
        "_raw",
        "_scanner",
    )

    def __init__(self, lenient: bool = True) -> None:
        super().__init__(self.MARKERS if lenient else self.STRICT_MARKERS)
        self._lenient = lenient
        self._mode = "text"  # text | lead | json | raw | tail
        self._begin("")

    def _begin(self, opener: str) -> None:
        """Reset the per-block state for a block opened by `opener` ("" for bare JSON)."""
        self._opener = opener
        self._raw: list[str] = []
        self._json_at = 0
        self._depth = 0  # 1 when the block is a list of call objects
        self._scanner = JsonScanner()
        self._num_block_calls = 0
        self._new_element()

    def _new_element(self) -> None:
        """Reset the per-call state (the block's object, or the next element of its list)."""
        self._name: str | None = None
        self._index: int | None = None
        self._pending: list[FieldDone] = []
        self._has_args = False

    def _step(self, c: str) -> None:
        if self._mode == "text":
            self._text_step(c)
        elif self._mode == "tail":
            self._tail_step(c)
        else:
            self._raw.append(c)
            if self._mode == "lead":
                self._lead_step(c)
            elif self._mode == "json":
                self._json_step(c)
            elif self._closer:
                self._raw_step()

    @property
    def _closer(self) -> str:
        return _CLOSERS[fold(self._opener)]

    @property
    def _committed(self) -> bool:
        return fold(self._opener) == "<tool_call>" or self._num_block_calls > 0

    def _open(self, marker: str) -> None:
        self._begin(marker)
        self._mode = "lead"

    def _plain(self, c: str) -> None:
        if c in "{[" and self._line_start and self._lenient:
            self._begin("")
            self._mode = "lead"
            self._raw.append(c)
            self._lead_step(c)
        else:
            self._text_out(c)

    def _lead_step(self, c: str) -> None:
        """Whitespace between the opener and the object's `{` (or the list's `[`)."""
        if c in "{[":
            self._mode = "json"
            self._json_at = len(self._raw) - 1
            self._depth = int(c == "[")
            self._json_step(c)
        elif not c.isspace():
            self._malformed()

    def _json_step(self, c: str) -> None:
        for done in self._scanner.push(c):
            if self._mode == "json":  # not when a first element gave the block back
                self._on_done(done)
        if self._mode != "json":
            return
        if self._scanner.malformed:
            self._malformed()
        elif self._scanner.finished:
            self._end_block()

    def _on_done(self, done: Value) -> None:
        """A value inside the block completed."""
        if len(done.path) <= self._depth:
            if len(done.path) == self._depth:  # the call object (or list element) closed
                self._end_element(done.text)
            return
        path = done.path[self._depth :]
        if path == ("name",):
            name = _loads(done.text)
            self._name = name if isinstance(name, str) else None
        elif len(path) == 2 and path[0] in _ARG_KEYS:
            value = _loads(done.text, _BAD)
            if value is _BAD:
                self._scanner.malformed = True
                return
            self._pending.append(FieldDone(-1, str(path[1]), value))
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Emit CallStart (and held fields) once the object is known to be a call."""
        stack = self._scanner.stack
        in_args = len(stack) > self._depth and stack[self._depth].key in _ARG_KEYS
        self._has_args = self._has_args or in_args
        if self._name is None:
            return
        if self._index is None:
            if not (self._committed or self._has_args):
                return
            self._index = self._new_index()
            self._emit(CallStart(self._index, self._name))
        for event in self._pending:
            self._emit(FieldDone(self._index, event.key, event.value))
        self._pending.clear()

    def _end_element(self, text: str) -> None:
        """A call object (or list element) closed: end its call, or give the block back."""
        self._maybe_start()
        if self._index is not None:
            self._end_call(self._index, text)
        elif not self._num_block_calls:
            self._give_back()
        self._new_element()

    def _end_call(self, index: int, text: str) -> None:
        """Emit the call's end with its parsed arguments, or its raw text if they are bad."""
        whole = _loads(text)
        raw_args = None
        if isinstance(whole, dict):
            raw_args = next((whole[k] for k in _ARG_KEYS if k in whole), {})
        args = _loads(raw_args) if isinstance(raw_args, str) else raw_args
        if not isinstance(args, dict):
            self._emit(CallEnd(index, text))
        else:
            for key, value in args.items() if isinstance(raw_args, str) else ():
                self._emit(FieldDone(index, key, value))
            self._emit(CallEnd(index, args))
        self._num_block_calls += 1

    def _end_block(self) -> None:
        """The block's JSON value closed."""
        if not self._num_block_calls:  # an empty list
            self._give_back()
            return
        self._mode = "tail" if self._closer else "text"
        self._line_start = False
        self._raw = []

    def _give_back(self) -> None:
        """The block is no call: its text so far goes out as Text."""
        self._mode = "text"
        self._text_out(self._opener + "".join(self._raw))

    def _malformed(self) -> None:
        """Bad JSON: committed blocks run raw to their closer; others go back to text."""
        if self._committed or self._index is not None:
            self._mode = "raw"
            return
        last = self._raw.pop()
        self._give_back()
        self._step(last)

    def _raw_step(self) -> None:
        """In a raw block: end it when its closer has arrived."""
        size = len(self._closer)
        closer = "".join(self._raw[-size:])
        if fold(closer) == self._closer:
            del self._raw[-size:]
            self._end_raw(closer)

    def _end_raw(self, closer: str = "") -> None:
        """A raw block ended at its closer (as written) or at close()."""
        self._mode = "text"
        if self._index is not None:
            self._emit(CallEnd(self._index, self._element_text()))
        elif not self._num_block_calls:
            self._text_out(self._opener + "".join(self._raw) + closer)

    def _element_text(self) -> str:
        """The raw text of the open call object, from its `{`."""
        stack = self._scanner.stack
        start = stack[self._depth].start if len(stack) > self._depth else 0
        return "".join(self._raw[self._json_at + start :]).strip()

    def _tail_step(self, c: str) -> None:
        """After a call: swallow optional whitespace and the closing tag or fence."""
        self._raw.append(c)
        held = fold("".join(self._raw).lstrip())
        if held == self._closer:
            self._mode = "text"
        elif not self._closer.startswith(held):
            chars, self._raw, self._mode = self._raw, [], "text"
            for ch in chars:
                self._step(ch)

    def _finish(self) -> None:
        if self._mode == "text":
            self._flush_held()
        elif self._mode == "tail":
            self._text_out("".join(self._raw))
        else:
            self._end_raw()
        self._mode = "text"


_BAD = object()


def _loads(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default
