"""Stored responses for `previous_response_id` and `GET /v1/responses/{id}`: bounded in count
and bytes, expiring. Pure Python; used from the event loop only (no lock).

An entry is the response as returned plus its conversation: the chat messages the engine
rendered (instructions excluded, as OpenAI does not carry them over) followed by the
response's output as messages. Its size is counted as the JSON of both; past `max_bytes` or
`max_entries` the least recently used entries go first, and an entry older than `ttl_s` is
gone. A response larger than `max_bytes` alone is not stored.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]
    messages: tuple[dict[str, Any], ...]
    num_bytes: int
    expires_at: float


class ResponseStore:
    """Responses by id, least recently used first."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self.num_bytes = 0
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def memory(self) -> int:
        """Bytes held by the entries still alive (for /metrics)."""
        self._expire()
        return self.num_bytes

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
        """Store a response; False when it alone is larger than the byte bound."""
        self.pop(response_id)
        size = len(json.dumps(response)) + len(json.dumps(messages))
        if size > self.max_bytes or self.max_entries == 0:
            return False
        self._expire()
        while self._entries and (
            len(self._entries) >= self.max_entries or self.num_bytes + size > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))
        self._entries[response_id] = StoredResponse(
            response, tuple(messages), size, self._clock() + self.ttl_s
        )
        self.num_bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when it is unknown, deleted or expired."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def pop(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._drop(response_id)
        return entry

    def _expire(self) -> None:
        now = self._clock()
        for response_id in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        self.num_bytes -= self._entries.pop(response_id).num_bytes
