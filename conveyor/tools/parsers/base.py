"""Character-driven parser core shared by the formats: event buffering and opening markers."""

from __future__ import annotations

from conveyor.tools.parsers.events import Event, Text


class StreamParser:
    """Feeds text one character at a time to `_step`; subclasses emit events.

    Text is gathered per feed and emitted as one `Text` before the next other event,
    so the events never depend on how the text was split, except for how Text deltas are cut.
    """

    __slots__ = ("_events", "_num_calls", "_text")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._text: list[str] = []
        self._num_calls = 0

    def feed(self, text: str) -> list[Event]:
        """Consume a chunk of model output; return the events it completed."""
        for c in text:
            self._step(c)
        return self._drain()

    def close(self) -> list[Event]:
        """End of the response: finish or flush whatever is open."""
        self._finish()
        return self._drain()

    def _step(self, c: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _emit(self, event: Event) -> None:
        self._flush_text()
        self._events.append(event)

    def _add_text(self, text: str) -> None:
        if text:
            self._text.append(text)

    def _new_index(self) -> int:
        self._num_calls += 1
        return self._num_calls - 1

    def _flush_text(self) -> None:
        if self._text:
            self._events.append(Text("".join(self._text)))
            self._text.clear()

    def _drain(self) -> list[Event]:
        self._flush_text()
        events, self._events = self._events, []
        return events


def fold(text: str) -> str:
    """Lower-case ASCII text for marker matching (non-ASCII text is left as is, so that no
    other character can fold onto a marker's letter)."""
    return text.lower() if text.isascii() else text


class MarkerParser(StreamParser):
    """Text mode that watches for opening markers (held back while they may still match).

    Markers are matched regardless of ASCII case (```JSON opens like ```json); `_open` gets
    the text as written, and `fold(marker)` is the marker it matched.
    """

    __slots__ = ("_held", "_line_start", "_markers")

    def __init__(self, markers: tuple[str, ...]) -> None:
        super().__init__()
        self._markers = tuple(fold(m) for m in markers)
        self._held = ""
        self._line_start = True

    def _text_step(self, c: str) -> None:
        """One character in text mode: extend a marker match, open a block, or pass it on."""
        s, self._held = self._held + c, ""
        folded = fold(s)
        if any(m.startswith(folded) for m in self._markers):
            if folded in self._markers:
                self._open(s)
            else:
                self._held = s
            return
        self._plain(s[0])
        for rest in s[1:]:
            self._step(rest)

    def _plain(self, c: str) -> None:
        """A text character that is not part of a marker."""
        self._text_out(c)

    def _text_out(self, text: str) -> None:
        """Emit text and track whether only whitespace follows the last newline."""
        self._add_text(text)
        _, newline, tail = text.rpartition("\n")
        if newline:
            self._line_start = not tail.strip()
        elif tail.strip():
            self._line_start = False

    def _flush_held(self) -> None:
        if self._held:
            self._text_out(self._held)
            self._held = ""

    def _open(self, marker: str) -> None:
        raise NotImplementedError
