"""What happens to the KV of a request waiting on a tool: preserve, discard or swap.

Pure Python. Follows InferCept (Abhyankar et al., ICML 2024, github.com/WukLab/InferCept,
``vllm/core/scheduler_v2.py``): the cost of each choice is the memory it wastes, in
block-seconds, and each step the scheduler takes the choice of least waste per request.

- **preserve**: the blocks stay on the device while the tool runs:
  ``blocks x expected remaining tool time``.
- **discard**: the blocks are freed and the context is prefilled again on resume, in chunks
  within the step budget; while it recomputes, the running batch's memory and the request's
  own are held for the extra forward time: ``recompute_s x (running blocks + blocks)``.
- **swap**: the blocks are copied to the host pool and back before resume; on a CPU the copies
  are not overlapped with the forward pass, so they stall the batch the same way:
  ``2 x blocks x swap_s_per_block x (running blocks + blocks)``; at most ``swap_budget_blocks``
  per step (measured at start-up).

Fixed policies (``preserve``, ``discard``, ``swap``) are the baselines; ``new-request``
behaves like today's servers: the tool call ends the request and the continuation is a new
request (new arrival, last in line) that prefills what the prefix cache no longer holds
(everything, with prefix caching off). The scheduler's KV policy holds one `Strategy` (`strategy(policy)`) and asks it each of these decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from conveyor.config import InterceptPolicy
from conveyor.core.request import Request, by_arrival

POLICIES = tuple(p.value for p in InterceptPolicy)


@dataclass(slots=True)
class Costs:
    """Measured costs: one block's copy one way (at start-up), prefill time per token and the
    time of a step (running averages over the engine's forward passes)."""

    swap_s_per_block: float = 1e-4
    swap_budget_blocks: int = 64
    prefill_s_per_token: float = 1e-3
    step_s: float = 0.05

    def observe_step(self, num_tokens: int, elapsed_s: float, weight: float = 0.1) -> None:
        """Fold one forward pass into the averages (steps of a few tokens are mostly fixed
        cost, so only steps of at least 16 tokens count towards the per-token time)."""
        if elapsed_s <= 0:
            return
        self.step_s += weight * (elapsed_s - self.step_s)
        if num_tokens >= 16:
            self.prefill_s_per_token += weight * (elapsed_s / num_tokens - self.prefill_s_per_token)


@dataclass(slots=True)
class ToolTimes:
    """Expected tool time: the tool's declared estimate, else a running mean of that tool's
    past calls, else ``default_s``."""

    default_s: float = 1.0
    _sum_s: dict[str | None, float] = field(default_factory=dict)
    _count: dict[str | None, int] = field(default_factory=dict)

    def expected_s(self, tool: str | None, declared_s: float | None = None) -> float:
        if declared_s is not None:
            return declared_s
        n = self._count.get(tool, 0)
        return self._sum_s[tool] / n if n else self.default_s

    def record(self, tool: str | None, duration_s: float) -> None:
        self._sum_s[tool] = self._sum_s.get(tool, 0.0) + duration_s
        self._count[tool] = self._count.get(tool, 0) + 1


@dataclass(frozen=True, slots=True)
class Waste:
    """Block-seconds each choice would waste for one request waiting on a tool."""

    request: Request
    num_blocks: int
    preserve: float
    discard: float
    swap: float

    @property
    def gain(self) -> float:
        """What freeing the blocks saves over keeping them (by the cheaper way to free them)."""
        return self.preserve - min(self.discard, self.swap)


def waste_of(request: Request, remaining_s: float, running_blocks: int, costs: Costs) -> Waste:
    """The three wastes of ``request``, which holds ``len(request.block_table)`` device blocks."""
    blocks = len(request.block_table)
    held = running_blocks + blocks
    recompute_s = request.num_computed_tokens * costs.prefill_s_per_token
    swap_s = 2 * blocks * costs.swap_s_per_block
    return Waste(request, blocks, blocks * max(remaining_s, 0.0), recompute_s * held, swap_s * held)


@dataclass(slots=True)
class Decisions:
    swap: list[Request] = field(default_factory=list)
    discard: list[Request] = field(default_factory=list)


def choose(
    wastes: Sequence[Waste],
    need_blocks: int,
    swap_budget_blocks: int,
    host_free_blocks: int,
    step_s: float = 0.0,
) -> Decisions:
    """Min-waste choice for one step: requests in order of what freeing them gains, most first;
    each is swapped if that is its least waste and the swap budget and host pool allow, else
    discarded if that wastes less than preserving, else preserved; stop once ``need_blocks``
    are freed (memory nobody asks for is not worth any waste).

    A swap the step's budget cannot take is deferred rather than discarded when keeping the
    blocks until a later step's budget (``step_s`` per step) and swapping then wastes less than
    recomputing: the budget is per step, so on a CPU, where copies are cheap next to a
    recompute, a burst of calls is swapped over a few steps instead of mostly dropped."""
    decisions = Decisions()
    freed = deferred = 0
    budget_room, host_room = swap_budget_blocks, host_free_blocks
    for w in sorted(wastes, key=lambda w: w.gain, reverse=True):
        if freed >= need_blocks or w.gain <= 0:
            break
        n = w.num_blocks
        fits_budget = n <= budget_room or budget_room == swap_budget_blocks  # a big one may overrun
        if w.swap <= w.discard and n <= host_room and fits_budget:
            decisions.swap.append(w.request)
            budget_room -= n
            host_room -= n
        elif (
            w.swap <= w.discard
            and n <= host_room
            and _deferral_waste(w, deferred, swap_budget_blocks, step_s) <= w.discard
        ):
            deferred += n  # kept this step; swapped once a step's budget reaches it
            host_room -= n
        elif w.discard < w.preserve:
            decisions.discard.append(w.request)
        else:
            continue
        freed += n
    return decisions


def _deferral_waste(w: Waste, blocks_ahead: int, swap_budget_blocks: int, step_s: float) -> float:
    """Keeping ``w``'s blocks until the step whose swap budget reaches them (after
    ``blocks_ahead`` deferred blocks), then swapping them."""
    return w.num_blocks * (1 + blocks_ahead // max(swap_budget_blocks, 1)) * step_s + w.swap


def fixed(policy: str, holding: Sequence[Request], host_free_blocks: int) -> Decisions:
    """The fixed policies: every request that still holds device blocks is swapped (while the
    host pool has room, else discarded), discarded, or kept."""
    decisions = Decisions()
    if policy in (InterceptPolicy.DISCARD, InterceptPolicy.NEW_REQUEST):
        decisions.discard.extend(holding)
    elif policy == InterceptPolicy.SWAP:
        for request in holding:
            n = len(request.block_table)
            if n <= host_free_blocks:
                decisions.swap.append(request)
                host_free_blocks -= n
            else:
                decisions.discard.append(request)
    elif policy not in (InterceptPolicy.PRESERVE, InterceptPolicy.AUTO):
        raise ValueError(f"unknown intercept policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return decisions


class Strategy:
    """A fixed policy: preserve, discard, swap or new-request (see the module docstring)."""

    reclaims_on_demand = True  # a queued request short of blocks takes them from requests on tools

    def __init__(self, policy: InterceptPolicy) -> None:
        self.policy = policy
        self.swaps = policy is InterceptPolicy.SWAP  # reclaim and preempt by swap where the host has room
        self.new_request = policy is InterceptPolicy.NEW_REQUEST  # dropped KV: the continuation is new

    def settle(
        self,
        holding: Sequence[Request],
        host_free_blocks: int,
        waste: Callable[[Request], Waste],
        need_blocks: Callable[[], int],
        costs: Costs,
    ) -> Decisions:
        """This step's swaps and discards among the requests on tools that hold device blocks."""
        return fixed(self.policy, holding, host_free_blocks)

    def victim(self, holding: Sequence[Request], waste: Callable[[Request], Waste]) -> Request:
        """Whose KV to take when blocks are short: the newest request on a tool."""
        return max(holding, key=by_arrival)

    def swap_preempts(self, request: Request, costs: Costs) -> bool:
        """Whether preempting a running request swaps its KV out (else it recomputes)."""
        return self.swaps


class AutoStrategy(Strategy):
    """Least waste per request (InferCept): `choose` each step, the most wasteful kept KV
    first when blocks are short, preemption by swap where the copy costs less than recompute."""

    reclaims_on_demand = False  # `settle` has already freed what is worth freeing for the queue

    def __init__(self, policy: InterceptPolicy = InterceptPolicy.AUTO) -> None:
        super().__init__(policy)
        self.swaps = True

    def settle(
        self,
        holding: Sequence[Request],
        host_free_blocks: int,
        waste: Callable[[Request], Waste],
        need_blocks: Callable[[], int],
        costs: Costs,
    ) -> Decisions:
        return choose(
            [waste(r) for r in holding],
            need_blocks(),
            costs.swap_budget_blocks,
            host_free_blocks,
            costs.step_s,
        )

    def victim(self, holding: Sequence[Request], waste: Callable[[Request], Waste]) -> Request:
        return max((waste(r) for r in holding), key=lambda w: w.preserve).request

    def swap_preempts(self, request: Request, costs: Costs) -> bool:
        w = waste_of(request, 0.0, 0, costs)  # the same costs as a tool wait's
        return w.swap < w.discard


def strategy(policy: str) -> Strategy:
    """The strategy of an intercept policy name (SchedulerConfig.intercept)."""
    policy = InterceptPolicy(policy)
    return AutoStrategy() if policy is InterceptPolicy.AUTO else Strategy(policy)
