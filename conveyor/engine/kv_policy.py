"""What happens to KV when memory or a tool takes a request out of the batch: the
`Scheduler`'s part that applies the intercept policy (engine/intercept.py) to requests
waiting on tools, reclaims their blocks when others need them, and preempts running
requests (by swap where the policy swaps, else by recompute). Pure Python.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

from conveyor.config import SchedulerConfig
from conveyor.engine import intercept
from conveyor.engine.block_manager import BlockManager
from conveyor.engine.plan import SchedulerOutput, Swap
from conveyor.engine.request import Request, RequestState, by_arrival


class KVPolicy:
    """Mixed into `Scheduler`, whose queues and block manager it works on."""

    config: SchedulerConfig
    block_manager: BlockManager
    costs: intercept.Costs
    tool_times: intercept.ToolTimes
    clock: Callable[[], float]
    waiting: list[Request]
    running: list[Request]
    swapped: list[Request]
    awaiting_tool: dict[str, Request]

    def _intercept(self, out: SchedulerOutput) -> None:
        """Swap out or drop the KV of requests waiting on tools, by the intercept policy."""
        holding = [r for r in self.awaiting_tool.values() if r.block_table]
        if not holding:
            return
        policy, host_free = self.config.intercept, self.block_manager.num_free_host_blocks
        if policy == "auto":
            decisions = intercept.choose([self._waste(r) for r in holding], self._num_needed_blocks(),
                                         self.costs.swap_budget_blocks, host_free, self.costs.step_s)
        else:
            decisions = intercept.fixed(policy, holding, host_free)
        for request in decisions.swap:
            self._swap_out(request, out)
        for request in decisions.discard:
            self._drop_kv(request)

    def _waste(self, request: Request) -> intercept.Waste:
        expected_s = self.tool_times.expected_s(request.tool, request.tool_declared_s)
        remaining_s = expected_s - (self.clock() - request.paused_at_s)
        running_blocks = sum(len(r.block_table) for r in self.running)
        return intercept.waste_of(request, remaining_s, running_blocks, self.costs)

    def _num_needed_blocks(self) -> int:
        """Blocks that queued requests (swapped and waiting) and one more token of each running
        request need beyond the free ones: what freeing KV of requests on tools could serve."""
        bm = self.block_manager
        queued = sum(bm.blocks_for(r.num_tokens) - len(r.block_table) for r in self.swapped + self.waiting)
        growth = sum(max(0, bm.blocks_for(r.num_tokens + 1) - len(r.block_table)) for r in self.running)
        return queued + growth - bm.num_free_blocks

    def _swap_out(self, request: Request, out: SchedulerOutput) -> bool:
        pairs = self.block_manager.swap_out(request)
        if pairs is None:
            return False
        out.swaps.append(Swap(True, pairs))
        return True

    def _reclaim_from_awaiting(self, out: SchedulerOutput) -> bool:
        """Blocks are short: free the KV of one request waiting on a tool, the newest (auto: the
        one whose keeping wastes most); swapped out where the policy swaps and the host pool
        has room, else dropped (it recomputes on resume)."""
        holding = [r for r in self.awaiting_tool.values() if r.block_table]
        if not holding:
            return False
        if self.config.intercept == "auto":
            victim = max((self._waste(r) for r in holding), key=lambda w: w.preserve).request
        else:
            victim = max(holding, key=by_arrival)
        if self.config.intercept not in ("swap", "auto") or not self._swap_out(victim, out):
            self._drop_kv(victim)
        return True

    def _drop_kv(self, request: Request) -> None:
        request.recompute_until = max(request.recompute_until, request.num_computed_tokens)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take a running request's KV away: swapped to the host pool where the policy swaps
        (auto: where the copy costs less than the recompute) and there is room, else dropped."""
        if self._swap_preempts(request) and self._swap_out(request, out):
            request.num_preemptions += 1
            request.state = RequestState.SWAPPED
            bisect.insort(self.swapped, request, key=by_arrival)
            return
        self._drop_kv(request)
        request.state = RequestState.WAITING
        bisect.insort(self.waiting, request, key=by_arrival)

    def _swap_preempts(self, request: Request) -> bool:
        if self.config.intercept != "auto":
            return self.config.intercept == "swap"
        waste = intercept.waste_of(request, 0.0, 0, self.costs)    # the same costs as a tool wait's
        return waste.swap < waste.discard
