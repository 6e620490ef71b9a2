"""Incremental detokenization (whole characters only) and stop-string matching."""

from __future__ import annotations

from dataclasses import dataclass, field

_CONTEXT = 5  # tokens decoded before the new ones so that spacing and merges come out right


@dataclass(slots=True)
class Detokenizer:
    """Turns a request's new tokens into new text; never emits half a UTF-8 character.

    ``stop`` strings end the text: output is held back while it could still be the
    start of a stop string, and cut where one matches.
    """

    tokenizer: object
    ids: list[int]
    stop: tuple[str, ...] = ()
    text: str = ""  # all output text so far, stop strings cut off
    emitted: int = 0  # characters of ``text`` already handed out
    stopped: bool = False
    _prefix: int = field(init=False)
    _read: int = field(init=False)

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        self.skip_context()

    def skip_context(self, ids: list[int] = ()) -> None:
        """Append tokens that are context, not output (a tool result): they produce no text,
        and the next turn's text (and stop-string matching) starts afresh. ``flush`` first."""
        self.ids.extend(ids)
        self._read = len(self.ids)
        self._prefix = max(self._read - _CONTEXT, 0)
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add one output token; return the text that is now final."""
        self.ids.append(token_id)
        self._decode_new(final=False)
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """At the end of the request: whatever was held back, an incomplete character included."""
        if not self.stopped:
            self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._match_stop()

    def _match_stop(self) -> None:
        found = [at for s in self.stop if (at := self.text.find(s, max(self.emitted - len(s), 0))) >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = max(len(self.text) - (0 if final else self._held()), self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _held(self) -> int:
        """Characters at the end of the text that could still begin a stop string: only those
        wait (a tool's parser sees the rest at once, which partial execution depends on)."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held
