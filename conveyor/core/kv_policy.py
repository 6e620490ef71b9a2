"""What happens to KV when memory or a tool takes a request out of the batch: the
scheduler's `KVPolicy` applies its intercept strategy (core/intercept.py) to requests
waiting on tools, reclaims their blocks when others need them, and preempts running
requests (by swap where the strategy swaps, else by recompute). Pure Python.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from conveyor.core import intercept
from conveyor.core.block_manager import BlockManager
from conveyor.core.request import Request, RequestState, by_arrival
from conveyor.core.sessions import SessionKeeper
from conveyor.core.step_plan import SchedulerOutput, Swap


@dataclass(slots=True)
class Queues:
    """The scheduler's requests by state, each list sorted by arrival."""

    waiting: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    swapped: list[Request] = field(default_factory=list)
    awaiting_tool: dict[str, Request] = field(default_factory=dict)


class KVPolicy:
    """The KV side of the scheduler, over the scheduler's queues and block manager."""

    def __init__(
        self,
        strategy: intercept.Strategy,
        block_manager: BlockManager,
        queues: Queues,
        costs: intercept.Costs,
        tool_times: intercept.ToolTimes,
        clock: Callable[[], float],
        sessions: SessionKeeper,
    ) -> None:
        self.strategy = strategy
        self.block_manager = block_manager
        self.queues = queues
        self.costs = costs
        self.tool_times = tool_times
        self.clock = clock
        self.sessions = sessions

    def settle_sessions(self) -> None:
        """Retained sessions past their TTL, or worth less than the blocks queued work needs,
        go back to the prefix cache."""
        if self.sessions.retained:
            self.sessions.settle(self._num_needed_blocks(), self._running_blocks(), self._claimed())

    def _claimed(self) -> set[str]:
        """Retained sessions whose follow-up is queued: it takes their KV over."""
        return {r.continues for r in self.queues.waiting if r.continues}

    def _running_blocks(self) -> int:
        return sum(len(r.block_table) for r in self.queues.running)

    def intercept(self, out: SchedulerOutput) -> None:
        """Swap out or drop the KV of requests waiting on tools, by the strategy."""
        holding = [r for r in self.queues.awaiting_tool.values() if r.block_table]
        if not holding:
            return
        decisions = self.strategy.settle(
            holding, self.block_manager.num_free_host_blocks, self._waste, self._num_needed_blocks, self.costs
        )
        for request in decisions.swap:
            self._swap_out(request, out)
        for request in decisions.discard:
            self.drop_kv(request)

    def _waste(self, request: Request) -> intercept.Waste:
        expected_s = self.tool_times.expected_s(request.tool, request.tool_declared_s)
        remaining_s = expected_s - (self.clock() - request.paused_at_s)
        return intercept.waste_of(request, remaining_s, self._running_blocks(), self.costs)

    def _num_needed_blocks(self) -> int:
        """Blocks that queued requests (swapped and waiting) and one more token of each running
        request need beyond the free ones: what freeing KV of requests on tools could serve."""
        bm, q = self.block_manager, self.queues
        queued = sum(
            bm.blocks_for(r.num_tokens) - len(r.block_table) - self.sessions.claimed_blocks(r)
            for r in q.swapped + q.waiting
        )
        growth = sum(max(0, bm.blocks_for(r.num_tokens + 1) - len(r.block_table)) for r in q.running)
        return queued + growth - bm.num_free_blocks

    def _swap_out(self, request: Request, out: SchedulerOutput) -> bool:
        pairs = self.block_manager.swap_out(request)
        if pairs is None:
            return False
        out.swaps.append(Swap(True, pairs))
        return True

    def reclaim_session(self) -> bool:
        """Blocks are short: give up a retained session (its client may never come back)."""
        return self.sessions.reclaim(self._running_blocks(), self._claimed())

    def reclaim_from_awaiting(self, out: SchedulerOutput) -> bool:
        """Blocks are short: give up a retained session first, else free the KV of one request
        waiting on a tool (the strategy's victim); swapped out where the strategy swaps and the
        host pool has room, else dropped (it recomputes on resume)."""
        if self.reclaim_session():
            return True
        holding = [r for r in self.queues.awaiting_tool.values() if r.block_table]
        if not holding:
            return False
        victim = self.strategy.victim(holding, self._waste)
        if not self.strategy.swaps or not self._swap_out(victim, out):
            self.drop_kv(victim)
        return True

    def drop_kv(self, request: Request) -> None:
        request.recompute_until = max(request.recompute_until, request.num_computed_tokens)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1

    def preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take a running request's KV away: swapped to the host pool where the strategy swaps
        (auto: where the copy costs less than the recompute) and there is room, else dropped."""
        if self.strategy.swap_preempts(request, self.costs) and self._swap_out(request, out):
            request.num_preemptions += 1
            request.state = RequestState.SWAPPED
            bisect.insort(self.queues.swapped, request, key=by_arrival)
            return
        self.drop_kv(request)
        request.state = RequestState.WAITING
        bisect.insort(self.queues.waiting, request, key=by_arrival)
