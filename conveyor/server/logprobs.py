"""OpenAI's logprobs shapes from the engine's `OutputLogprobs`: chat's `content` entries
(token, logprob, bytes, top_logprobs) and the legacy completions' four lists (tokens,
token_logprobs, top_logprobs, text_offset). A token that holds part of a UTF-8 character shows
as text with U+FFFD in its place; its `bytes` are exact. A chat choice's entries cover every
token the model wrote as text, the text of its tool calls included (over all tool rounds), and
no stop token."""

from __future__ import annotations

import codecs
from typing import Any

from conveyor.engine.api import Logprob, OutputLogprobs


def token_text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[OutputLogprobs]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs` object."""
    return {
        "content": [
            {**_chat_token(e.chosen), "top_logprobs": [_chat_token(t) for t in e.top]} for e in entries
        ],
        "refusal": None,
    }


def _chat_token(t: Logprob) -> dict[str, Any]:
    return {"token": token_text(t.token), "logprob": t.logprob, "bytes": list(t.token)}


class LegacyLogprobs:
    """One completion choice's legacy `logprobs`, taken a piece at a time (a stream's chunks):
    `text_offset` is the character of the choice's text where each token's text begins (a
    token inside a multi-byte character starts where that character does)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, entries: list[OutputLogprobs]) -> dict[str, Any]:
        piece: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for e in entries:
            piece["tokens"].append(token_text(e.chosen.token))
            piece["token_logprobs"].append(e.chosen.logprob)
            top: dict[str, float] = {}
            for t in e.top:  # tokens of one text (parts of characters): the most likely one's
                top.setdefault(token_text(t.token), t.logprob)
            piece["top_logprobs"].append(top)
            piece["text_offset"].append(self.offset)
            self.offset += len(self._decoder.decode(e.chosen.token))
        return piece


class LogprobTap:
    """An engine output stream passed through unchanged, keeping the logprobs of the outputs
    read so far until `take`n (a chunk carries those of the outputs before it)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pending: list[OutputLogprobs] = []

    def __aiter__(self) -> LogprobTap:
        return self

    async def __anext__(self) -> Any:
        out = await self.stream.__anext__()
        self.pending.extend(out.logprobs or ())
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()

    def take(self) -> list[OutputLogprobs]:
        taken, self.pending = self.pending, []
        return taken
