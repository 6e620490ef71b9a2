"""One step's plan: which tokens of which requests run, within a token budget.

Pure Python. Every request is scheduled the same way: its next chunk is the tokens
that have no KV yet (a prompt, a decode token, tool-result tokens after a resume,
or a whole context after preemption), cut to what the step's budget still allows.
Running requests go first (decodes, then longer chunks, each oldest first); then
waiting ones, strictly first come, first served by original arrival. When blocks
run out, requests waiting on tools give up their KV first (they recompute it on
resume), then the newest running request is preempted: its blocks are freed
(they stay in the prefix cache) and it is recomputed later.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from conveyor.config import SchedulerConfig
from conveyor.engine.block_manager import BlockManager
from conveyor.engine.request import FinishCause, Request, RequestState


@dataclass(slots=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at token index ``start``."""
    request: Request
    start: int
    num_tokens: int
    sample: bool  # the chunk reaches the last known token: sample the next one


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def _by_arrival(request: Request) -> int:
    return request.arrival


class Scheduler:
    """Queues requests by state and plans each step; owns block allocation for them."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        # a request must always fit in the whole pool, or a preempted one could never come back
        self.max_model_len = min(max_model_len, block_manager.num_blocks * block_manager.block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.awaiting_tool: dict[str, Request] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.state = RequestState.WAITING
        bisect.insort(self.waiting, request, key=_by_arrival)

    # ---- planning -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # decodes first, so a long resume or recompute chunk never starves them
        order = sorted(self.running, key=lambda r: (r.num_uncomputed_tokens > 1, r.arrival))
        scheduled: set[str] = set()
        for request in order:
            if budget <= 0 or len(out.chunks) >= self.config.max_num_seqs:
                break
            if request.state is not RequestState.RUNNING:     # preempted earlier in this loop
                continue
            n = min(request.num_uncomputed_tokens, budget)
            if not self._allocate_running(request, n, scheduled, out):
                continue
            out.chunks.append(Chunk(request, request.num_computed_tokens, n, n == request.num_uncomputed_tokens))
            scheduled.add(request.request_id)
            budget -= n
        return budget

    def _allocate_running(self, request: Request, n: int, scheduled: set[str], out: SchedulerOutput) -> bool:
        """Blocks for ``n`` more tokens: reclaim from requests waiting on tools first, then
        preempt the newest running request not yet scheduled (possibly ``request`` itself)."""
        while not self.block_manager.try_allocate(request, n):
            if self._reclaim_from_awaiting():
                continue
            victim = max((r for r in self.running if r.request_id not in scheduled), key=_by_arrival)
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _reclaim_from_awaiting(self) -> bool:
        """Drop the KV of the newest request waiting on a tool (it recomputes on resume).
        Issue 7's intercept policy will choose between keeping, swapping and dropping."""
        holding = [r for r in self.awaiting_tool.values() if r.block_table]
        if not holding:
            return False
        self._drop_kv(max(holding, key=_by_arrival))
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(out.chunks) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = self._allocate_waiting(request, budget)
            if n is None:
                return
            self.waiting.pop(0)
            request.state = RequestState.RUNNING
            bisect.insort(self.running, request, key=_by_arrival)
            out.chunks.append(Chunk(request, request.num_computed_tokens, n, n == request.num_uncomputed_tokens))
            budget -= n

    def _allocate_waiting(self, request: Request, budget: int) -> int | None:
        """Adopt the request's cached prefix and allocate its first chunk; the chunk's size, or
        None if it does not fit even after reclaiming from requests waiting on tools."""
        while True:
            prefix = self.block_manager.lookup_prefix(request.token_ids)   # reclaiming may evict some
            n = min(request.num_tokens - len(prefix) * self.block_manager.block_size, budget)
            if self.block_manager.try_allocate(request, n, prefix):
                return n
            if not self._reclaim_from_awaiting():
                return None

    def _drop_kv(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1

    def _preempt(self, request: Request) -> None:
        self._drop_kv(request)
        request.state = RequestState.WAITING
        bisect.insort(self.waiting, request, key=_by_arrival)

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
            self.block_manager.register_full_blocks(request)
            if token is None:
                continue
            request.token_ids.append(token)
            request.output_token_ids.append(token)
            updated.append(request)
            cause = self._stop_cause(request, token)
            if cause is FinishCause.STOP_TOKEN and request.pause_on_stop:
                self.pause_for_tool(request)    # keeps its KV; the engine finishes or resumes it
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
    def pause_for_tool(self, request: Request) -> None:
        """Take a running (or preempted, waiting) request out of the batch; KV it has stays."""
        if request.state is RequestState.RUNNING:
            self.running.remove(request)
        elif request.state is RequestState.WAITING and request.output_token_ids:
            self.waiting.remove(request)
        else:
            raise ValueError(f"request {request.request_id} is {request.state.value}, not running")
        request.state = RequestState.AWAITING_TOOL
        self.awaiting_tool[request.request_id] = request

    def resume(self, request: Request, appended_token_ids: list[int]) -> None:
        """Put a paused request back; only the tokens without KV (the appended ones and
        the last sampled token) are prefilled, unless its KV was reclaimed meanwhile."""
        if request.state is not RequestState.AWAITING_TOOL:
            raise ValueError(f"request {request.request_id} is {request.state.value}, not awaiting a tool")
        if request.num_tokens + len(appended_token_ids) >= self.max_model_len:
            raise ValueError(f"request {request.request_id} would exceed max_model_len={self.max_model_len}")
        del self.awaiting_tool[request.request_id]
        request.token_ids.extend(appended_token_ids)
        if request.block_table:
            request.state = RequestState.RUNNING
            bisect.insort(self.running, request, key=_by_arrival)
        else:   # its KV was reclaimed while it waited: queue it to recompute (the prefix cache may help)
            self.add(request)

    def finish(self, request: Request, cause: FinishCause) -> None:
        """End a request in any state and free its blocks."""
        if request.state is RequestState.FINISHED:
            return
        if request.state is RequestState.WAITING:
            self.waiting.remove(request)
        elif request.state is RequestState.RUNNING:
            self.running.remove(request)
        else:
            del self.awaiting_tool[request.request_id]
        self.block_manager.free(request)
        request.state = RequestState.FINISHED
        request.finish_cause = cause
