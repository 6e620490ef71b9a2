"""Hermes/Qwen JSON calls: `<tool_call>{...}</tool_call>`, a ```json fence, or bare JSON.

A call object is `{"name": ..., "arguments": {...}}` ("parameters" is accepted for
"arguments"; a JSON-encoded arguments string is decoded at the end). Each top-level
argument yields `FieldDone` the moment its value closes.

Where a call is recognised: after `<tool_call>` the block is a call as soon as its name
is known; a ```json fence, or a `{` that is the first non-blank character of a line, is a
call only once both its "name" value and its "arguments" key have been seen. Until then
the text is held back, and it goes out as `Text` if it turns out not to be a call.

Malformed JSON never raises: a block whose `CallStart` went out ends with
`CallEnd(index, raw_json_text)` at its closing tag or fence (at `close()` for bare JSON);
a block that never got a name is emitted as `Text`.
"""
from __future__ import annotations

import json
from typing import Any

from conveyor.tools.parsers.base import MarkerParser
from conveyor.tools.parsers.events import CallEnd, CallStart, FieldDone
from conveyor.tools.parsers.jsonscan import Done, JsonScanner

_CLOSERS = {"<tool_call>": "</tool_call>", "```json\n": "```", "": ""}
_ARG_KEYS = ("arguments", "parameters")


class HermesParser(MarkerParser):
    """Streaming parser for JSON tool calls (see the module docstring)."""

    __slots__ = (
        "_has_args",
        "_index",
        "_json_at",
        "_mode",
        "_name",
        "_opener",
        "_pending",
        "_raw",
        "_scanner",
    )

    def __init__(self) -> None:
        super().__init__(("<tool_call>", "```json\n"))
        self._mode = "text"  # text | lead | json | raw | tail
        self._begin("")

    def _begin(self, opener: str) -> None:
        """Reset the per-block state for a block opened by `opener` ("" for bare JSON)."""
        self._opener = opener
        self._raw: list[str] = []
        self._json_at = 0
        self._scanner = JsonScanner()
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
            elif self._closer and "".join(self._raw[-len(self._closer):]) == self._closer:
                del self._raw[-len(self._closer):]
                self._end_raw()

    @property
    def _closer(self) -> str:
        return _CLOSERS[self._opener]

    @property
    def _committed(self) -> bool:
        return self._opener == "<tool_call>"

    def _open(self, marker: str) -> None:
        self._begin(marker)
        self._mode = "lead"

    def _plain(self, c: str) -> None:
        if c == "{" and self._line_start:
            self._begin("")
            self._mode = "lead"
            self._raw.append(c)
            self._lead_step(c)
        else:
            self._text_out(c)

    def _lead_step(self, c: str) -> None:
        """Whitespace between the opener and the object's `{`."""
        if c == "{":
            self._mode = "json"
            self._json_at = len(self._raw) - 1
            self._json_step(c)
        elif not c.isspace():
            self._malformed()

    def _json_step(self, c: str) -> None:
        for done in self._scanner.push(c):
            self._on_done(done)
        if self._scanner.malformed:
            self._malformed()
        elif self._scanner.finished:
            self._end_json()

    def _on_done(self, done: Done) -> None:
        """A value inside the call object completed."""
        if done.path == ("name",):
            name = _loads(done.text)
            self._name = name if isinstance(name, str) else None
        elif len(done.path) == 2 and done.path[0] in _ARG_KEYS:
            value = _loads(done.text, _BAD)
            if value is _BAD:
                self._scanner.malformed = True
                return
            self._pending.append(FieldDone(-1, str(done.path[1]), value))
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Emit CallStart (and held fields) once the block is known to be a call."""
        stack = self._scanner.stack
        self._has_args = self._has_args or (bool(stack) and stack[0].key in _ARG_KEYS)
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

    def _end_json(self) -> None:
        """The call object closed: finish the call, or give the text back if it is none."""
        self._maybe_start()
        if self._index is None:
            self._mode = "text"
            self._text_out(self._opener + "".join(self._raw))
            return
        text = "".join(self._raw[self._json_at:])
        whole = _loads(text)
        raw_args = None
        if isinstance(whole, dict):
            raw_args = next((whole[k] for k in _ARG_KEYS if k in whole), {})
        args = _loads(raw_args) if isinstance(raw_args, str) else raw_args
        if not isinstance(args, dict):
            self._emit(CallEnd(self._index, text))
        else:
            for key, value in args.items() if isinstance(raw_args, str) else ():
                self._emit(FieldDone(self._index, key, value))
            self._emit(CallEnd(self._index, args))
        self._mode = "tail" if self._closer else "text"
        self._line_start = False
        self._raw = []

    def _malformed(self) -> None:
        """Bad JSON: committed blocks run raw to their closer; others go back to text."""
        if self._committed or self._index is not None:
            self._mode = "raw"
            return
        last = self._raw.pop()
        self._mode = "text"
        self._text_out(self._opener + "".join(self._raw))
        self._step(last)

    def _end_raw(self) -> None:
        """A raw block ended at its closer or at close()."""
        raw = "".join(self._raw)
        self._mode = "text"
        if self._index is None:
            self._text_out(self._opener + raw + self._closer)
        else:
            self._emit(CallEnd(self._index, raw.strip()))

    def _tail_step(self, c: str) -> None:
        """After a call: swallow optional whitespace and the closing tag or fence."""
        self._raw.append(c)
        held = "".join(self._raw).lstrip()
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
        elif self._mode in ("raw", "json") and self._index is not None:
            self._end_raw()
        else:
            self._text_out(self._opener + "".join(self._raw))
        self._mode = "text"


_BAD = object()


def _loads(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default

