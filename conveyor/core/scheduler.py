"""One step's plan: which tokens of which requests run, within a token budget.

Pure Python. Every request is scheduled the same way: its next chunk is the tokens
that have no KV yet (a prompt, a decode token, tool-result tokens after a resume,
or a whole context after preemption), cut to what the step's budget still allows.
Each step first settles the KV of requests waiting on tools by the intercept policy
(core/intercept.py: preserve, discard, swap to host memory, or least waste). Then, as
in InferCept, three queues by original arrival: requests whose KV is in host memory
(resumed after a tool, or preempted) are swapped back in (within the step's swap budget),
running requests go first (decodes, then longer chunks, each oldest first), then waiting
ones in the order of `--schedule` (core/programs.py: each request's arrival, its program's
arrival, or the program's least service so far), strictly in that order (the head is never
skipped), and only when no swapped request is left. When blocks run out, requests
waiting on tools give up their KV first (swapped or dropped), then the newest running
request is preempted: swapped out where the policy swaps, else its blocks are freed (they
stay in the prefix cache) and it is recomputed later. The KV side of this (intercept
policy, reclaiming, preemption) is the `kv_policy.KVPolicy` the scheduler holds; the plan handed to the runner is
`step_plan.SchedulerOutput`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from conveyor.config import SchedulerConfig
from conveyor.core import intercept
from conveyor.core.block_manager import BlockManager
from conveyor.core.kv_policy import KVPolicy, Queues
from conveyor.core.programs import Order
from conveyor.core.request import (
    FinishCause,
    Request,
    RequestState,
    by_arrival,
    new_arrival,
)
from conveyor.core.sessions import SessionKeeper
from conveyor.core.step_plan import Chunk, SchedulerOutput, Swap


class Scheduler:
    """Queues requests by state and plans each step; owns block allocation for them."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        costs: intercept.Costs | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        # a request must always fit in the whole pool, or a preempted one could never come back
        self.max_model_len = min(max_model_len, block_manager.num_blocks * block_manager.block_size)
        self.queues = Queues()
        self.waiting, self.running, self.swapped = (
            self.queues.waiting,
            self.queues.running,
            self.queues.swapped,
        )
        self.awaiting_tool = self.queues.awaiting_tool  # the same objects: never rebound
        self.costs = costs or intercept.Costs()
        self.tool_times = intercept.ToolTimes(config.default_tool_s)
        self.clock = clock
        self.sessions = SessionKeeper(
            block_manager,
            self.tool_times,
            self.costs,
            clock,
            config.session_ttl_factor,
            config.session_max_ttl_s,
        )
        self.kv = KVPolicy(
            intercept.strategy(config.intercept),
            block_manager,
            self.queues,
            self.costs,
            self.tool_times,
            clock,
            self.sessions,
        )
        self.order = Order(config.schedule, config.starvation_s, clock)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def add(self, request: Request) -> None:
        """Queue a new request; it joins its program (`request.session_id`)."""
        self.order.join(request)
        self._queue(request)

    def _queue(self, request: Request) -> None:
        request.state = RequestState.WAITING
        request.queued_at_s = self.clock()
        bisect.insort(self.waiting, request, key=by_arrival)

    # ---- planning -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.kv.settle_sessions()
        self.kv.intercept(out)
        self._schedule_swapped(out)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted and not self.swapped:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        """Swap requests back in (resumed after a tool, or preempted) by arrival while the step's
        swap budget lasts (the last one may overrun it, so a request larger than the budget
        still moves)."""
        budget = self.costs.swap_budget_blocks
        while self.swapped and budget > 0:
            request = self.swapped[0]
            pairs = self.block_manager.swap_in(request)
            while pairs is None and self.kv.reclaim_from_awaiting(out):
                pairs = self.block_manager.swap_in(request)
            if pairs is None:
                return
            out.swaps.append(Swap(False, pairs))
            budget -= len(pairs)
            self.swapped.pop(0)
            request.state = RequestState.RUNNING
            bisect.insort(self.running, request, key=by_arrival)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # decodes first, so a long resume or recompute chunk never starves them
        order = sorted(self.running, key=lambda r: (r.num_uncomputed_tokens > 1, self.order.key(r)))
        scheduled: set[str] = set()
        for request in order:
            if budget <= 0 or len(out.chunks) >= self.config.max_num_seqs:
                break
            if request.state is not RequestState.RUNNING:  # preempted earlier in this loop
                continue
            n = min(request.num_uncomputed_tokens, budget)
            if not self._allocate_running(request, n, scheduled, out):
                continue
            out.chunks.append(
                Chunk(request, request.num_computed_tokens, n, n == request.num_uncomputed_tokens)
            )
            scheduled.add(request.request_id)
            budget -= n
        return budget

    def _allocate_running(self, request: Request, n: int, scheduled: set[str], out: SchedulerOutput) -> bool:
        """Blocks for ``n`` more tokens: reclaim from requests waiting on tools first, then
        preempt the newest running request not yet scheduled (possibly ``request`` itself)."""
        while not self.block_manager.try_allocate(request, n):
            if self.kv.reclaim_from_awaiting(out):
                continue
            victim = max((r for r in self.running if r.request_id not in scheduled), key=self.order.key)
            self.running.remove(victim)
            self.kv.preempt(victim, out)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=self.order.key)  # keys move as programs receive service
        in_flight = self._blocks_in_flight(out.chunks) if self.waiting else set()
        while self.waiting and budget > 0 and len(out.chunks) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = self._allocate_waiting(request, budget, out, in_flight)
            if n is None:
                return
            self.waiting.pop(0)
            request.state = RequestState.RUNNING
            bisect.insort(self.running, request, key=by_arrival)
            chunk = Chunk(request, request.num_computed_tokens, n, n == request.num_uncomputed_tokens)
            out.chunks.append(chunk)
            in_flight |= self._blocks_in_flight([chunk])
            budget -= n

    def _blocks_in_flight(self, chunks: list[Chunk]) -> set[bytes]:
        """Prefix-cache hashes of the blocks these chunks fill."""
        fill = self.block_manager.filled_hashes
        return {h for c in chunks for h in fill(c.request, c.start + c.num_tokens)}

    def _allocate_waiting(
        self, request: Request, budget: int, out: SchedulerOutput, in_flight: set[bytes]
    ) -> int | None:
        """Adopt the request's cached prefix and allocate its first chunk; the chunk's size, or
        None if it does not fit even after reclaiming from requests waiting on tools, or if its
        next block is one that this step computes for another request (the same prompt sent n
        times, or twice at once): it waits one step and adopts that block instead of computing
        it again. A request that continues a retained session takes that KV over first."""
        if self.sessions.hand_over(request, request.continues):
            n = min(request.num_uncomputed_tokens, budget)
            if self.block_manager.try_allocate(request, n):
                return n
            self.block_manager.free(request)  # back to the prefix cache; look it up as usual
            request.num_computed_tokens = 0
        bs = self.block_manager.block_size
        while True:  # reclaiming may evict cached blocks: look the prefix up each time
            prefix = self.block_manager.lookup_prefix(request.token_ids)
            next_block = self.block_manager.filled_hashes(request, (len(prefix) + 1) * bs)[len(prefix) :]
            if next_block and next_block[0] in in_flight and (len(prefix) + 1) * bs < request.num_tokens:
                return None
            n = min(request.num_tokens - len(prefix) * bs, budget)
            if self.block_manager.try_allocate(request, n, prefix):
                return n
            if self.kv.reclaim_session():  # whatever the strategy: sessions are not its to settle
                continue
            if not self.kv.strategy.reclaims_on_demand or not self.kv.reclaim_from_awaiting(out):
                return None

    # ---- after the forward pass -----------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Request]:
        """Record computed chunks and sampled tokens (one per chunk, None where the chunk
        did not sample); finish requests that hit a stop token or a length limit.
        Returns the requests that got a new token."""
        updated = []
        for chunk, token in zip(out.chunks, sampled, strict=True):
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            request.num_computed_total += chunk.num_tokens
            self.order.charge(request, chunk.num_tokens)
            self.block_manager.register_full_blocks(request)
            if token is None:
                continue
            request.token_ids.append(token)
            request.output_token_ids.append(token)
            updated.append(request)
            cause = self._stop_cause(request, token)
            if cause is FinishCause.STOP_TOKEN and request.pause_on_stop:
                self.pause_for_tool(request)  # keeps its KV; the engine finishes or resumes it
            elif cause is not None:
                self.finish(request, cause)
        return updated

    def _stop_cause(self, request: Request, token: int) -> FinishCause | None:
        params = request.params
        if token in request.stop_token_ids:
            return FinishCause.STOP_TOKEN
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishCause.LENGTH
        return None

    # ---- lifecycle ------------------------------------------------------------------------
    def pause_for_tool(
        self, request: Request, tool: str | None = None, declared_s: float | None = None
    ) -> None:
        """Take a running (or preempted: waiting or swapped) request out of the batch; KV it has
        stays until the intercept policy decides at the next step. ``tool`` and ``declared_s``
        (the tool's own estimate of its time) feed the expected waiting time."""
        if request.state is RequestState.RUNNING:
            self.running.remove(request)
        elif request.state is RequestState.WAITING and request.output_token_ids:
            self.waiting.remove(request)
        elif request.state is RequestState.SWAPPED:
            self.swapped.remove(request)
        else:
            raise ValueError(f"request {request.request_id} is {request.state.value}, not running")
        request.state = RequestState.AWAITING_TOOL
        request.tool, request.tool_declared_s, request.paused_at_s = tool, declared_s, self.clock()
        self.awaiting_tool[request.request_id] = request

    def resume(self, request: Request, appended_token_ids: list[int]) -> None:
        """Put a paused request back; only the tokens without KV (the appended ones and
        the last sampled token) are prefilled, unless its KV was reclaimed meanwhile."""
        if request.state is not RequestState.AWAITING_TOOL:
            raise ValueError(f"request {request.request_id} is {request.state.value}, not awaiting a tool")
        if request.num_tokens + len(appended_token_ids) >= self.max_model_len:
            raise ValueError(f"request {request.request_id} would exceed max_model_len={self.max_model_len}")
        del self.awaiting_tool[request.request_id]
        self.tool_times.record(request.tool, self.clock() - request.paused_at_s)
        request.token_ids.extend(appended_token_ids)
        if request.block_table:
            request.state = RequestState.RUNNING
            bisect.insort(self.running, request, key=by_arrival)
        elif request.host_block_table:
            request.state = RequestState.SWAPPED
            bisect.insort(self.swapped, request, key=by_arrival)
        else:  # its KV was dropped while it waited: queue it to recompute (the prefix cache may help)
            if self.kv.strategy.new_request:
                request.arrival = new_arrival()  # the continuation is a new request, last in line
            self._queue(request)

    def finish(self, request: Request, cause: FinishCause, client_tool: str | None = None) -> None:
        """End a request in any state and free its blocks; a turn that ended with calls of the
        client's tool `client_tool` keeps them for the follow-up (`SchedulerConfig.session_kv`),
        and so, until the engine has read its calls, does one that offered only the client's
        tools and ended at a stop token."""
        if request.state is RequestState.FINISHED:
            return
        if request.state is RequestState.WAITING:
            self.waiting.remove(request)
        elif request.state is RequestState.RUNNING:
            self.running.remove(request)
        elif request.state is RequestState.SWAPPED:
            self.swapped.remove(request)
        else:
            del self.awaiting_tool[request.request_id]
        keeps = self._keeps(request, cause, client_tool)
        if not (keeps and self.sessions.retain(request, client_tool, request.client_tool_s)):
            self.block_manager.free(request)
        self.order.leave(request)
        request.state = RequestState.FINISHED
        request.finish_cause = cause

    def _keeps(self, request: Request, cause: FinishCause, client_tool: str | None) -> bool:
        if not self.config.session_kv:
            return False
        if cause is FinishCause.TOOL_CALLS:
            return client_tool is not None
        return (
            cause is FinishCause.STOP_TOKEN and request.client_tools is not None and not request.pause_on_stop
        )
