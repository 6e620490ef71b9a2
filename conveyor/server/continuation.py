"""Exact continuation, the server's part: which conversations it answered, and the prompt of a
follow-up that repeats one (the arithmetic is core/sessions.py's, the rendering the engine's).

A conversation is remembered when the engine ended its turn with a stop token and reported the
request's tokens (`RequestOutput.final_token_ids`), under the digest of the model, the tools
shown and the messages with the assistant message exactly as this server returned it (content,
call ids, names and arguments). A follow-up whose messages begin with it, the last assistant
message that matches first, becomes a `ContinuedChat`. Turns that ran server tools are not
remembered (their results are not messages the client sends back in this form). Used on the
event loop only: no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conveyor.config import ServerConfig
from conveyor.core.sessions import TokenIndex, conversation_keys
from conveyor.engine.api import ContinuedChat
from conveyor.server.protocol import Message, chat_messages

MIB = 1 << 20


class Continuations:
    """The server's index of answered conversations (bounded: `--continuation-*`)."""

    def __init__(self, config: ServerConfig, model: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = config.exact_continuation
        self.model = model
        self.index = TokenIndex(
            config.continuation_entries, config.continuation_mb * MIB, config.continuation_ttl_s, clock
        )

    def prompt(
        self, messages: list[dict[str, Any]], tools: list[Any]
    ) -> list[dict[str, Any]] | ContinuedChat:
        """`messages` as the engine's prompt: a `ContinuedChat` where they begin with a
        conversation this server answered and more messages follow it."""
        if not self.enabled or not len(self.index):
            return messages
        keys = conversation_keys(self.model, tools, messages)
        for k in range(len(messages) - 2, -1, -1):
            if messages[k]["role"] != "assistant":
                continue
            entry = self.index.get(keys[k])
            if entry is not None:
                return ContinuedChat(messages, k + 1, entry.token_ids.tolist(), entry.source_id)
        return messages

    def remember(
        self, messages: list[dict[str, Any]], tools: list[Any], reply: dict[str, Any], out: Any
    ) -> None:
        """The engine's last output `out` of a request with `messages` ended the turn that the
        server returned as the assistant message `reply` (OpenAI's shape)."""
        if not self.enabled or out.final_token_ids is None:
            return
        returned = chat_messages([Message.model_validate(reply)])  # as a client sends it back
        key = conversation_keys(self.model, tools, [*messages, *returned])[-1]
        self.index.put(key, out.final_token_ids, out.request_id)
