"""Programs and --schedule: program-level FCFS, least attained service and its starvation guard,
on the pure scheduler with hand-made arrivals and a hand-driven clock."""

from __future__ import annotations

import pytest

from conveyor.config import SchedulerConfig
from conveyor.core.block_manager import BlockManager
from conveyor.core.programs import Order, Programs, prefix_session_id
from conveyor.core.request import FinishCause, Request, RequestState, SamplingParams
from conveyor.core.scheduler import Scheduler

EOS = 0


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make(
    schedule: str,
    clock: Clock,
    budget: int = 8,
    max_seqs: int = 1,
    starvation_s: float = 10.0,
    num_blocks: int = 256,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, schedule=schedule, starvation_s=starvation_s
    )
    return Scheduler(config, BlockManager(num_blocks, 4), 1024, clock=clock)


def turn(rid: str, session: str | None, n: int = 4, max_tokens: int = 2) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    return Request(rid, list(range(1, n + 1)), params, stop_token_ids=frozenset({EOS}), session_id=session)


def step(s: Scheduler) -> list[str]:
    out = s.schedule()
    s.postprocess(out, [7 if c.sample else None for c in out.chunks])
    return [c.request.request_id for c in out.chunks]


def run_to_end(s: Scheduler, request: Request, clock: Clock | None = None) -> None:
    while not request.finished:
        step(s)
        if clock:
            clock.now_s += 1


def test_fcfs_queues_a_follow_up_turn_behind_newer_programs() -> None:
    s = make("fcfs", Clock())
    first = turn("a1", "A")
    s.add(first)
    run_to_end(s, first)
    s.add(turn("b1", "B"))
    s.add(turn("a2", "A"))  # A's second turn, after B arrived
    assert step(s) == ["b1"]


def test_program_fcfs_serves_a_program_s_turns_at_its_first_arrival() -> None:
    s = make("program-fcfs", Clock())
    first = turn("a1", "A")
    s.add(first)
    run_to_end(s, first)
    s.add(turn("b1", "B"))
    s.add(turn("a2", "A"))
    assert step(s) == ["a2"]


def test_las_serves_the_program_with_least_service_first() -> None:
    s = make("las", Clock(), budget=64)
    long_turn = turn("a1", "A", n=40)
    s.add(long_turn)
    run_to_end(s, long_turn)  # A received 40 prefilled + 1 decoded tokens
    assert s.order.programs.of(long_turn).service == 41
    s.add(turn("a2", "A"))
    s.add(turn("b1", "B"))  # newer, but B has received nothing yet
    assert step(s) == ["b1"]


def test_las_preempts_the_program_with_most_service() -> None:
    s = make("las", Clock(), budget=64, max_seqs=4, num_blocks=3)
    heavy, light = turn("h", "H", n=4, max_tokens=8), turn("l", "L", n=4, max_tokens=8)
    s.order.join(heavy)
    s.order.charge(heavy, 100)  # H has had much service before this turn
    s.order.leave(heavy)
    s.add(heavy), s.add(light)
    step(s)  # both prefilled (one block each) and one token sampled: each needs a second block
    out = s.schedule()  # l (least service) takes the last free one; h gives way
    assert [r.request_id for r in out.preempted] == ["h"]


def test_las_does_not_starve_a_long_program_under_a_stream_of_short_ones() -> None:
    """One request a step: a fresh one-turn program arrives every step, each with less
    service than the long program's second turn. The guard serves that turn once it has
    waited starvation_s; without the guard it would wait for as long as the stream lasts."""
    clock = Clock()
    s = make("las", clock, budget=64, starvation_s=5.0)
    first = turn("long-1", "L", n=32)
    s.add(first)
    run_to_end(s, first, clock)
    second = turn("long-2", "L", n=4)
    s.add(second)
    served_at = None
    for i in range(60):  # bounded: 60 steps of one second
        s.add(turn(f"short-{i}", f"S{i}", n=4, max_tokens=1))
        if "long-2" in step(s) and served_at is None:
            served_at = clock.now_s - second.queued_at_s
        clock.now_s += 1
    assert served_at is not None and served_at <= 5.0 + 2.0


def test_without_the_guard_the_same_arrivals_would_starve_it() -> None:
    """The control of the test above: a guard longer than the run, and the turn never runs."""
    clock = Clock()
    s = make("las", clock, budget=64, starvation_s=1e9)
    first = turn("long-1", "L", n=32)
    s.add(first)
    run_to_end(s, first, clock)
    second = turn("long-2", "L", n=4)
    s.add(second)
    for i in range(60):
        s.add(turn(f"short-{i}", f"S{i}", n=4, max_tokens=1))
        assert "long-2" not in step(s)
        clock.now_s += 1
    assert second.state is RequestState.WAITING


def test_requests_without_a_session_are_programs_of_their_own() -> None:
    order = Order("program-fcfs")
    a, b = turn("a", None), turn("b", None)
    order.join(a), order.join(b)
    assert order.key(a) < order.key(b)
    order.charge(a, 5)
    assert order.programs.of(a).service == 5 and order.programs.of(b).service == 0


def test_idle_programs_are_bounded_and_live_ones_kept() -> None:
    programs = Programs(max_idle=2)
    live = turn("live", "L")
    programs.join(live)
    for i in range(5):
        r = turn(f"r{i}", f"P{i}")
        programs.join(r)
        programs.leave(r)
    assert len(programs) == 3  # the live program and the two most recent idle ones
    assert programs.of(live).num_live == 1


def test_finishing_a_request_leaves_its_program() -> None:
    s = make("las", Clock())
    r = turn("a", "A")
    s.add(r)
    s.finish(r, FinishCause.ABORT)
    assert s.order.programs.of(r).num_live == 0


def test_prefix_session_id_covers_the_opening_through_the_first_user_message() -> None:
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    later = [*opening, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert prefix_session_id(opening) == prefix_session_id(later)
    other = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "bye"}]
    assert prefix_session_id(other) != prefix_session_id(opening)
    assert prefix_session_id([{"role": "system", "content": "x"}]) is None


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="schedule must be one of fcfs, program-fcfs, las"):
        SchedulerConfig(schedule="sjf")
