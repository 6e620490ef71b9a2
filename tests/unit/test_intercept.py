"""Intercept policies: the waste arithmetic, the least-waste choice and the fixed policies."""

from __future__ import annotations

import pytest

from conveyor.core.intercept import Costs, ToolTimes, Waste, choose, fixed, waste_of
from conveyor.core.request import Request, SamplingParams


def holding(rid: str, num_blocks: int, num_computed: int) -> Request:
    r = Request(rid, list(range(1, num_computed + 2)), SamplingParams())
    r.block_table = list(range(num_blocks))
    r.num_computed_tokens = num_computed
    return r


def test_waste_arithmetic() -> None:
    costs = Costs(swap_s_per_block=0.01, swap_budget_blocks=8, prefill_s_per_token=0.002)
    r = holding("a", num_blocks=4, num_computed=60)
    w = waste_of(r, remaining_s=3.0, running_blocks=10, costs=costs)
    assert w.num_blocks == 4
    assert w.preserve == pytest.approx(4 * 3.0)  # blocks x remaining tool time
    assert w.discard == pytest.approx(60 * 0.002 * (10 + 4))  # recompute time x memory held meanwhile
    assert w.swap == pytest.approx(2 * 4 * 0.01 * (10 + 4))  # out and back, stalling the same memory
    assert w.gain == pytest.approx(w.preserve - w.swap)
    overdue = waste_of(r, remaining_s=-2.0, running_blocks=10, costs=costs)
    assert overdue.preserve == 0.0  # a late tool is expected back any moment


def test_tool_times_declared_then_running_mean_then_default() -> None:
    times = ToolTimes(default_s=1.5)
    assert times.expected_s("search") == 1.5
    assert times.expected_s("search", declared_s=7.0) == 7.0
    times.record("search", 2.0)
    times.record("search", 4.0)
    times.record("tts", 10.0)
    assert times.expected_s("search") == 3.0 and times.expected_s("tts") == 10.0


def test_costs_average_only_long_steps_per_token_and_every_step_per_step() -> None:
    costs = Costs(prefill_s_per_token=1.0, step_s=1.0)
    costs.observe_step(4, 100.0)  # a decode step: fixed cost dominates, ignored
    assert costs.prefill_s_per_token == 1.0
    costs.observe_step(100, 50.0, weight=0.5)  # 0.5 s/token folded in halfway
    assert costs.prefill_s_per_token == pytest.approx(0.75)
    assert costs.step_s == pytest.approx(30.45)  # 1 -> 1 + 0.1 x 99 = 10.9 -> 10.9 + 0.5 x 39.1


def waste(rid: str, blocks: int, preserve: float, discard: float, swap: float) -> Waste:
    return Waste(holding(rid, blocks, blocks * 4), blocks, preserve, discard, swap)


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def test_choose_swaps_best_gain_within_budget_then_discards_or_preserves() -> None:
    wastes = [
        waste("long-tool", 4, preserve=100, discard=20, swap=5),  # gain 95: swap
        waste("mid", 4, preserve=50, discard=10, swap=2),  # gain 48: budget spent -> discard
        waste("short-tool", 4, preserve=1, discard=10, swap=2),  # gain -1: keep
        waste("cheap-recompute", 2, preserve=30, discard=1, swap=3),
    ]  # gain 29: discard
    d = choose(wastes, need_blocks=100, swap_budget_blocks=5, host_free_blocks=100, step_s=10.0)
    assert ids(d.swap) == ["long-tool"]
    assert ids(d.discard) == ["mid", "cheap-recompute"]  # waiting 10 s for a budget: 4 x 10 + 2 > 10


def test_choose_defers_a_swap_past_the_budget_when_waiting_wastes_less_than_recomputing() -> None:
    wastes = [
        waste("a", 4, preserve=100, discard=20, swap=5),  # fits this step's budget
        waste("b", 4, preserve=90, discard=20, swap=5),  # next step: 4 x 0.1 + 5 <= 20
        waste("c", 4, preserve=80, discard=20, swap=5),  # two steps on: 4 x 0.2 + 5 <= 20
        waste("d", 4, preserve=70, discard=6, swap=5),
    ]  # 4 x 0.3 + 5 > 6: recompute
    d = choose(wastes, need_blocks=100, swap_budget_blocks=4, host_free_blocks=100, step_s=0.1)
    assert ids(d.swap) == ["a"] and ids(d.discard) == ["d"]  # b and c are kept for now
    full = choose(wastes[1:2], need_blocks=100, swap_budget_blocks=4, host_free_blocks=2, step_s=0.1)
    assert ids(full.discard) == ["b"]  # no host room: deferring cannot help


def test_choose_lets_one_request_larger_than_the_budget_overrun_it() -> None:
    d = choose(
        [
            waste("big", 10, preserve=100, discard=20, swap=5),
            waste("next", 4, preserve=90, discard=20, swap=5),
        ],
        need_blocks=100,
        swap_budget_blocks=4,
        host_free_blocks=100,
        step_s=0.1,
    )
    assert ids(d.swap) == ["big"] and d.discard == []  # "next" waits for the next budget


def test_choose_frees_only_what_is_needed() -> None:
    wastes = [waste("a", 4, preserve=100, discard=20, swap=5), waste("b", 4, preserve=90, discard=20, swap=5)]
    assert ids(choose(wastes, need_blocks=3, swap_budget_blocks=64, host_free_blocks=64).swap) == ["a"]
    nothing = choose(wastes, need_blocks=0, swap_budget_blocks=64, host_free_blocks=64)
    assert nothing.swap == [] and nothing.discard == []


def test_choose_discards_when_the_host_pool_is_full() -> None:
    d = choose(
        [waste("a", 4, preserve=100, discard=20, swap=5)],
        need_blocks=10,
        swap_budget_blocks=64,
        host_free_blocks=3,
    )
    assert d.swap == [] and ids(d.discard) == ["a"]


def test_fixed_policies() -> None:
    rs = [holding("a", 3, 10), holding("b", 3, 10)]
    assert fixed("preserve", rs, 100).swap == [] and fixed("preserve", rs, 100).discard == []
    assert ids(fixed("discard", rs, 100).discard) == ["a", "b"]
    assert ids(fixed("new-request", rs, 100).discard) == ["a", "b"]
    swap = fixed("swap", rs, host_free_blocks=4)  # room for one: the other is dropped
    assert ids(swap.swap) == ["a"] and ids(swap.discard) == ["b"]
    with pytest.raises(ValueError, match="unknown intercept policy"):
        fixed("keep", rs, 100)
