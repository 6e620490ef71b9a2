"""Agent sessions across client tool calls: the exact tokens of a conversation the engine
produced, and its KV kept while the client runs the tools. Pure Python.

A client that runs its own tools sends the whole conversation again after each call. Two
things make that follow-up cheap:

- **Exact continuation** (`TokenIndex`, `conversation_keys`, `follow_up_text`): the server
  remembers, per conversation it answered (keyed by a digest of the model, the tools shown
  and the messages including the assistant message exactly as returned), the token ids the
  engine ended that turn with: prompt, generated tokens and the end-of-turn token. A
  follow-up whose messages begin with such a conversation reuses those ids and renders only
  the messages after it, so the prefix cache matches the model's own output instead of a
  re-rendering of it. Any difference in the digest finds nothing and the prompt is rendered
  as usual: a miss costs a prefill, never a wrong prefix.
- **Session KV retention** (`SessionKeeper`): a request that ended with client tool calls
  keeps its blocks for a time-to-live (a multiple of the tool's expected time, capped), and
  under memory pressure gives them up by the same least-waste arithmetic as a server-side
  tool pause (`intercept.choose`; no swap: a follow-up finds KV only on the device). Blocks
  given up, or past their TTL, go back to the ordinary prefix cache. The follow-up that
  continues the retained request takes its blocks over whole, its last partial block too.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.core import intercept
from conveyor.core.block_manager import BlockManager
from conveyor.core.request import Request

ENTRY_OVERHEAD_BYTES = 160  # a dict slot, the entry object, its key and id strings, roughly
MAX_RELEASED = 1024  # sessions released before their follow-up came, remembered to time it


def conversation_keys(model: str, tools: Any, messages: Sequence[dict[str, Any]]) -> list[bytes]:
    """Digests of what decides a rendered prompt, one after each message: model, tool list and
    every message so far (key order kept: a template prints arguments in their given order).
    A chain, so all the prefixes of a conversation cost one pass over it."""
    key = _digest(b"", [model, tools])
    keys = []
    for message in messages:
        key = _digest(key, message)
        keys.append(key)
    return keys


def _digest(parent: bytes, value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(parent + text.encode("utf-8", "surrogatepass")).digest()


def follow_up_text(
    render: Callable[[list[dict[str, Any]], bool], str],
    messages: list[dict[str, Any]],
    num_reused: int,
    stop_text: str,
) -> str:
    """The text that follows the model's own end-of-turn token (`stop_text`) when the first
    `num_reused` messages come from reused tokens: the template's text between turns, then
    the later messages and the generation prompt exactly as a whole rendering would put them.

    `render(messages, add_generation_prompt)` is the chat template. ValueError where the
    template renders the reused turns differently once later messages follow, or ends the
    reused turn in a way the model's own tokens do not (the caller then renders it all)."""
    if not 0 < num_reused < len(messages) or not stop_text:
        raise ValueError("nothing to continue")
    head = render(messages[:num_reused], False)
    full = render(messages, True)
    if not full.startswith(head):
        raise ValueError("the template renders the reused turns differently once more messages follow")
    end = head.rfind(stop_text)
    glue = head[end + len(stop_text) :] if end >= 0 else None
    if glue is None or glue.strip():  # the turn must end with the model's own stop token
        raise ValueError("the template ends the reused turn with something the model did not generate")
    return glue + full[len(head) :]


@dataclass(slots=True)
class IndexEntry:
    token_ids: array  # array("i"): 4 bytes per token
    source_id: str  # the engine request that produced them (its KV may be retained)
    used_at: float

    @property
    def num_bytes(self) -> int:
        return self.token_ids.itemsize * len(self.token_ids) + len(self.source_id) + ENTRY_OVERHEAD_BYTES


class TokenIndex:
    """Conversation digest -> the token ids the engine ended that turn with. Bounded by
    entries and bytes (least recently used out first) and a time-to-live since last use."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries, self.max_bytes, self.ttl_s, self.clock = max_entries, max_bytes, ttl_s, clock
        self._entries: OrderedDict[bytes, IndexEntry] = OrderedDict()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: bytes, token_ids: Sequence[int], source_id: str) -> bool:
        """Remember `token_ids` under `key`; False (nothing kept) if one entry alone is too big."""
        self._drop(key)
        entry = IndexEntry(array("i", token_ids), source_id, self.clock())
        if entry.num_bytes + len(key) > self.max_bytes or self.max_entries <= 0:
            return False
        self._entries[key] = entry
        self.num_bytes += entry.num_bytes + len(key)
        self._expire()
        while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def get(self, key: bytes) -> IndexEntry | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is not None:
            entry.used_at = self.clock()
            self._entries.move_to_end(key)
        return entry

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.used_at <= self.ttl_s:
                return
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry.num_bytes + len(key)


def ttl_s(expected_s: float, factor: float, max_s: float) -> float:
    """How long a finished request's KV waits for its follow-up: `factor` x the expected tool
    time (the client's own round trip included in the estimate), at most `max_s`."""
    return min(max(expected_s, 0.0) * factor, max_s)


class SessionKeeper:
    """Requests that ended with client tool calls and still hold their device blocks, by id.

    `retain` keeps a finished request's blocks; `settle` (each step) returns those past their
    TTL, and under pressure the least-waste ones, to the prefix cache; `hand_over` gives a
    retained request's blocks to the request that continues it; `reclaim` gives up one when
    blocks are short."""

    def __init__(
        self,
        block_manager: BlockManager,
        tool_times: intercept.ToolTimes,
        costs: intercept.Costs,
        clock: Callable[[], float],
        ttl_factor: float,
        max_ttl_s: float,
    ) -> None:
        self.block_manager, self.tool_times, self.costs, self.clock = block_manager, tool_times, costs, clock
        self.ttl_factor, self.max_ttl_s = ttl_factor, max_ttl_s
        self.retained: dict[str, Request] = {}
        # id -> (tool, finished at) of sessions released early: a late follow-up still times the
        # client's tools, or estimates would only ever learn the waits shorter than the TTL
        self._released: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        return sum(len(r.block_table) for r in self.retained.values())

    def retain(self, request: Request, tool: str | None, declared_s: float | None) -> bool:
        """Keep a finished request's blocks for its follow-up; False where there is nothing to
        keep (no blocks, or a TTL of 0)."""
        expected = self.tool_times.expected_s(tool, declared_s)
        if not request.block_table or ttl_s(expected, self.ttl_factor, self.max_ttl_s) <= 0:
            return False
        request.tool, request.tool_declared_s, request.paused_at_s = tool, declared_s, self.clock()
        self.retained[request.request_id] = request
        return True

    def hand_over(self, request: Request, source_id: str | None) -> bool:
        """Give `request` (no blocks yet) the KV of the retained request `source_id` if its
        computed tokens begin `request`'s; records the client's tool time. True if it did."""
        source = self.retained.get(source_id) if source_id else None
        if source is None and source_id in self._released:
            tool, finished_at = self._released.pop(source_id)
            self.tool_times.record(tool, self.clock() - finished_at)
        if source is None or request.block_table:
            return False
        n = source.num_computed_tokens
        if n >= request.num_tokens or request.token_ids[:n] != source.token_ids[:n]:
            return False
        del self.retained[source_id]
        self.tool_times.record(source.tool, self.clock() - source.paused_at_s)
        request.block_table, source.block_table = source.block_table, []
        request.block_hashes, source.block_hashes = source.block_hashes, []
        request.num_computed_tokens = n
        return True

    def settle(self, need_blocks: int, running_blocks: int, claimed: set[str]) -> None:
        """Release what is past its TTL, then, while `need_blocks` are wanted, what least
        waste says to free; never what a queued follow-up will take over (`claimed` ids)."""
        now = self.clock()
        for request in self._unclaimed(claimed):
            if now - request.paused_at_s > self._ttl(request):
                self.release(request)
        if need_blocks <= 0 or not self.retained:
            return
        wastes = [self._waste(r, running_blocks) for r in self._unclaimed(claimed)]
        for request in intercept.choose(wastes, need_blocks, 0, 0).discard:
            self.release(request)

    def reclaim(self, running_blocks: int, claimed: set[str]) -> bool:
        """Blocks are short: release the retained request whose keeping wastes most, one that a
        queued follow-up claims only when no other is left (that follow-up may be queued
        behind the request short of blocks)."""
        wastes = [self._waste(r, running_blocks) for r in self._unclaimed(claimed) or self.retained.values()]
        if not wastes:
            return False
        self.release(max(wastes, key=lambda w: (w.preserve, -w.request.arrival)).request)
        return True

    def claimed_blocks(self, request: Request) -> int:
        """Device blocks kept for `request`'s source: it takes them over instead of new ones."""
        source = self.retained.get(request.continues) if request.continues else None
        return len(source.block_table) if source is not None else 0

    def _unclaimed(self, claimed: set[str]) -> list[Request]:
        return [r for r in self.retained.values() if r.request_id not in claimed]

    def release(self, request: Request) -> None:
        """Back to the prefix cache: its full blocks stay adoptable until reused."""
        if self.retained.pop(request.request_id, None) is not None and request.tool is not None:
            self._released[request.request_id] = (request.tool, request.paused_at_s)
            if len(self._released) > MAX_RELEASED:
                self._released.popitem(last=False)
        self.block_manager.free(request)

    def _ttl(self, request: Request) -> float:
        expected = self.tool_times.expected_s(request.tool, request.tool_declared_s)
        return ttl_s(expected, self.ttl_factor, self.max_ttl_s)

    def _waste(self, request: Request, running_blocks: int) -> intercept.Waste:
        """As for a server-side tool pause, without swap; a client past its expected time is
        expected to take as long again (not 0 s, which would make keeping it look free)."""
        expected = self.tool_times.expected_s(request.tool, request.tool_declared_s)
        elapsed = self.clock() - request.paused_at_s
        remaining = expected - elapsed if elapsed < expected else expected
        w = intercept.waste_of(request, remaining, running_blocks, self.costs)
        return intercept.Waste(request, w.num_blocks, w.preserve, w.discard, float("inf"))
