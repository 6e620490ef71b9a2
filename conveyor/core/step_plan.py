"""The plan of one step, handed from the scheduler to the runner: plain data.

`SchedulerOutput` lists the chunks of tokens to compute (`Chunk`), the requests preempted to
make room, and the block copies between the device and host pools (`Swap`) to make first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.core.request import Request


@dataclass(slots=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at token index ``start``."""

    request: Request
    start: int
    num_tokens: int
    sample: bool  # the chunk reaches the last known token: sample the next one


@dataclass(frozen=True, slots=True)
class Swap:
    """Block copies between the pools: (device, host) pairs out, or (host, device) pairs in."""

    to_host: bool
    pairs: list[tuple[int, int]]


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)  # copy in this order, before the forward pass

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_recompute_tokens(self) -> int:
        """Tokens that had KV once before (dropped, then prefilled again)."""
        return sum(
            max(0, min(c.start + c.num_tokens, c.request.recompute_until) - c.start) for c in self.chunks
        )
