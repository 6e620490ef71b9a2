"""Scheduler: token budget, FCFS, preemption, tool pauses; a property test for block leaks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.config import SchedulerConfig
from conveyor.core.block_manager import BlockManager
from conveyor.core.request import FinishCause, Request, RequestState, SamplingParams
from conveyor.core.scheduler import Scheduler

EOS = 0


def make(
    num_blocks: int = 16, block_size: int = 4, budget: int = 8, max_seqs: int = 8, max_len: int = 64
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm, max_len)


def req(rid: str, n: int, max_tokens: int = 4) -> Request:
    return Request(
        rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), stop_token_ids=frozenset({EOS})
    )


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.postprocess(out, [token if c.sample else None for c in out.chunks])
    return out


def test_budget_chunks_prefill_and_decodes_first() -> None:
    s = make(budget=8)
    a, b = req("a", 3), req("b", 12)
    s.add(a), s.add(b)
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [
        ("a", 3, True),
        ("b", 5, False),
    ]
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [
        ("a", 1, True),
        ("b", 7, True),
    ]
    assert a.num_computed_tokens == 4 and b.num_computed_tokens == 12


def test_fcfs_waiting_never_skips_ahead() -> None:
    s = make(num_blocks=4, block_size=4, budget=64)
    big, small = req("big", 20), req("small", 2)
    s.add(big), s.add(small)
    out = s.schedule()
    assert out.chunks == []  # big does not fit; small must not jump the queue
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_preempts_newest_when_blocks_run_out() -> None:
    s = make(num_blocks=3, block_size=2, budget=16)
    a, b = req("a", 2, max_tokens=10), req("b", 2, max_tokens=10)
    s.add(a), s.add(b)
    run_step(s)  # both prefilled: one block each, one token sampled
    out = run_step(s)  # a takes the third block; b finds none: b (newest) preempted
    assert b in out.preempted and b.state is RequestState.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [c.request for c in out.chunks] == [a]


def test_pause_keeps_blocks_and_resume_prefills_only_new_tokens() -> None:
    s = make(budget=64)
    a = req("a", 5, max_tokens=20)
    s.add(a)
    run_step(s)
    blocks = list(a.block_table)
    s.pause_for_tool(a)
    assert a.state is RequestState.AWAITING_TOOL and a.block_table == blocks
    assert run_step(s).chunks == []
    s.resume(a, [40, 41, 42])
    out = run_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(5, 4)]  # last sampled token + 3 appended


def test_stop_token_and_length_finish_and_free() -> None:
    s = make(budget=64)
    a, b = req("a", 3, max_tokens=2), req("b", 3, max_tokens=9)
    s.add(a), s.add(b)
    out = s.schedule()
    s.postprocess(out, [5, EOS])
    assert b.finish_cause is FinishCause.STOP_TOKEN and b.block_table == []
    run_step(s)
    assert a.finish_cause is FinishCause.LENGTH and a.finish_reason == "length"
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "step", "abort", "pause", "resume"]), st.integers(0, 7), st.integers(1, 30)
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_no_block_leaks_under_random_operations(operations) -> None:
    s = make(num_blocks=10, block_size=4, budget=12, max_seqs=4, max_len=60)
    bm = s.block_manager
    live: dict[str, Request] = {}
    for i, (op, pick, n) in enumerate(operations):
        names = sorted(live)
        target = live[names[pick % len(names)]] if names else None
        if op == "add":
            live[f"r{i}"] = r = req(f"r{i}", n, max_tokens=1 + n % 6)
            s.add(r)
        elif op == "step":
            run_step(s, token=EOS if n % 9 == 0 else 3)
        elif op == "abort" and target:
            s.finish(target, FinishCause.ABORT)
        elif op == "pause" and target and target.state is RequestState.RUNNING:
            s.pause_for_tool(target)
        elif (
            op == "resume"
            and target
            and target.state is RequestState.AWAITING_TOOL
            and target.num_tokens + n % 5 < 60
        ):
            s.resume(target, [9] * (n % 5))
        live = {k: r for k, r in live.items() if not r.finished}
        held = sum(len(set(r.block_table)) for r in live.values())
        refs = sum(b.ref_count for b in bm.blocks)
        assert refs == sum(len(r.block_table) for r in live.values())
        assert bm.num_used_blocks <= held
        assert all(b.ref_count >= 0 for b in bm.blocks)
    for r in list(live.values()):
        s.finish(r, FinishCause.ABORT)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_decodes_go_before_long_chunks_of_older_requests() -> None:
    s = make(budget=8)
    a, b = req("a", 3, max_tokens=20), req("b", 3, max_tokens=20)
    s.add(a), s.add(b)
    run_step(s)
    s.pause_for_tool(a)
    s.resume(a, list(range(30)))  # a, the older request, now has 31 tokens to prefill
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 1), ("a", 7)]


def test_requests_waiting_on_tools_give_up_their_kv_first() -> None:
    s = make(num_blocks=6, block_size=4, budget=64)
    a = req("a", 12, max_tokens=20)
    b = Request("b", list(range(100, 116)), SamplingParams(max_tokens=2))  # shares no prefix with a
    s.add(a)
    run_step(s)
    s.pause_for_tool(a)
    assert len(a.block_table) == 3
    s.add(b)
    run_step(s)  # b needs 4 blocks, 3 are free: a's KV is dropped
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.num_preemptions == 1
    assert b.state is RequestState.RUNNING
    s.resume(a, [5, 6])
    assert a.state is RequestState.WAITING  # recomputes from the queue
    while not (a.finished and b.finished):
        run_step(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_config_values_are_checked() -> None:
    import pytest

    from conveyor.config import CacheConfig, ModelConfig

    for make_bad in (
        lambda: SchedulerConfig(max_num_batched_tokens=0),
        lambda: SchedulerConfig(max_num_seqs=0),
        lambda: CacheConfig(block_size=0),
        lambda: CacheConfig(num_blocks=-1),
        lambda: ModelConfig(device="tpu"),
    ):
        with pytest.raises(ValueError):
            make_bad()


# ---- intercept policies (core/intercept.py) -----------------------------------------------
def make_policy(
    policy: str,
    num_blocks: int = 16,
    num_host_blocks: int = 16,
    budget: int = 64,
    clock=lambda: 0.0,
    prefix_caching: bool = True,
) -> Scheduler:
    from conveyor.core.intercept import Costs

    bm = BlockManager(num_blocks, 4, prefix_caching, num_host_blocks=num_host_blocks)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, intercept=policy)
    return Scheduler(
        config,
        bm,
        64,
        Costs(swap_s_per_block=1e-4, swap_budget_blocks=8, prefill_s_per_token=1e-3),
        clock=clock,
    )


def fresh(rid: str, n: int) -> Request:
    """A request sharing no prefix with ``req``'s."""
    return Request(
        rid, list(range(100, 100 + n)), SamplingParams(max_tokens=2), stop_token_ids=frozenset({EOS})
    )


def paused_after_prompt(s: Scheduler, rid: str, n: int, **pause) -> Request:
    r = req(rid, n, max_tokens=20)
    s.add(r)
    run_step(s)
    s.pause_for_tool(r, **pause)
    return r


def test_swap_policy_swaps_out_then_in_before_resuming() -> None:
    s = make_policy("swap")
    a = paused_after_prompt(s, "a", 10)
    device = list(a.block_table)
    out = run_step(s)
    assert out.chunks == [] and [(w.to_host, [d for d, _ in w.pairs]) for w in out.swaps] == [(True, device)]
    assert a.block_table == [] and len(a.host_block_table) == 3 and a.num_computed_tokens == 10
    s.resume(a, [40, 41])
    assert a.state is RequestState.SWAPPED and s.has_work
    out = run_step(s)
    assert [w.to_host for w in out.swaps] == [False] and a.host_block_table == []
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(10, 3)]  # no recompute
    assert out.num_recompute_tokens == 0


def test_discard_policy_recomputes_the_whole_context_in_chunks() -> None:
    s = make_policy(
        "discard", budget=8, prefix_caching=False
    )  # else the freed blocks, unless reused, are adopted
    a = paused_after_prompt(s, "a", 8)
    run_step(s)
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.recompute_until == 8
    s.resume(a, [40])
    assert a.state is RequestState.WAITING
    chunks = [run_step(s) for _ in range(2)]
    assert [(c.chunks[0].start, c.chunks[0].num_tokens) for c in chunks] == [(0, 8), (8, 2)]
    assert [c.num_recompute_tokens for c in chunks] == [8, 0]


def test_new_request_policy_goes_to_the_back_of_the_queue() -> None:
    s = make_policy("new-request", num_blocks=5, prefix_caching=False)
    a = paused_after_prompt(s, "a", 8)
    b = fresh("b", 16)
    s.add(b)  # arrives after a, waits: a's blocks are dropped first
    run_step(s)
    assert a.block_table == []
    s.resume(a, [40])
    assert [r.request_id for r in s.waiting][-1] == "a" and a.arrival > b.arrival


def test_a_new_request_continuation_adopts_what_the_prefix_cache_still_holds() -> None:
    s = make_policy("new-request", num_blocks=8)
    a = paused_after_prompt(s, "a", 8)
    s.add(b := fresh("b", 8))
    run_step(s)  # the call ended a's request: its KV is freed, its full blocks stay cached
    assert a.block_table == [] and b.state is RequestState.RUNNING
    s.resume(a, [40])
    out = run_step(s)
    chunk = next(c for c in out.chunks if c.request is a)
    assert chunk.start == 8 and out.num_recompute_tokens == 0  # its two full blocks came from the cache


def test_auto_swaps_a_long_tool_wait_when_the_queue_needs_memory() -> None:
    s = make_policy("auto", num_blocks=6)
    a = paused_after_prompt(s, "a", 12, tool="tts", declared_s=20.0)
    s.add(b := fresh("b", 16))  # needs 4 blocks, 3 free
    out = run_step(s)
    assert a.host_block_table and a.block_table == [] and b.state is RequestState.RUNNING
    assert out.swaps[0].to_host


def test_auto_discards_without_a_host_pool_and_keeps_a_short_wait() -> None:
    s = make_policy("auto", num_blocks=6, num_host_blocks=0)
    a = paused_after_prompt(s, "a", 12, tool="tts", declared_s=20.0)
    s.add(fresh("b", 16))
    run_step(s)
    assert a.block_table == [] and a.host_block_table == [] and a.num_preemptions == 1
    s = make_policy("auto", num_blocks=6)
    a = paused_after_prompt(s, "a", 12, tool="calc", declared_s=0.0)
    s.add(b := fresh("b", 16))
    assert run_step(s).chunks == [] and len(a.block_table) == 3 and b.state is RequestState.WAITING


def test_swap_and_auto_preempt_a_running_request_by_swapping_it_out() -> None:
    for policy in ("swap", "auto"):
        s = make_policy(policy, num_blocks=3, num_host_blocks=8)
        a, b = req("a", 4, max_tokens=10), fresh("b", 4)
        s.add(a), s.add(b)
        run_step(s)  # one block each, one token sampled
        out = run_step(s)  # a takes the third block; b (newest) is swapped out
        assert b in out.preempted and b.state is RequestState.SWAPPED and b.num_preemptions == 1
        assert b.block_table == [] and len(b.host_block_table) == 1 and b.num_computed_tokens == 4
        assert [w.to_host for w in out.swaps] == [True]
        s.pause_for_tool(b)  # a call cut while it was swapped out
        assert b.state is RequestState.AWAITING_TOOL and b.host_block_table
        s.finish(a, FinishCause.ABORT)
        s.resume(b, [40])
        out = run_step(s)  # back in, then only the new tokens run
        assert [w.to_host for w in out.swaps] == [False] and out.num_recompute_tokens == 0
        assert [(c.request, c.start, c.num_tokens) for c in out.chunks] == [(b, 4, 2)]


def test_auto_preempts_by_recompute_when_that_is_cheaper_than_the_copy() -> None:
    s = make_policy("auto", num_blocks=3, num_host_blocks=8)
    s.costs.swap_s_per_block = 1.0  # copies dearer than recomputing 4 tokens at 1 ms
    a, b = req("a", 4, max_tokens=10), fresh("b", 4)
    s.add(a), s.add(b)
    run_step(s)
    out = run_step(s)
    assert b in out.preempted and b.state is RequestState.WAITING and b.host_block_table == []


def test_resume_records_the_tool_time() -> None:
    now = [0.0]
    s = make_policy("auto", clock=lambda: now[0])
    a = paused_after_prompt(s, "a", 4, tool="search")
    now[0] = 2.5
    s.resume(a, [1])
    assert s.tool_times.expected_s("search") == 2.5


policy_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "step", "abort", "pause", "resume"]), st.integers(0, 7), st.integers(1, 30)
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["preserve", "discard", "swap", "auto", "new-request"]), st.integers(0, 8), policy_ops)
def test_no_block_leaks_in_either_pool(policy, num_host_blocks, operations) -> None:
    now = [0.0]
    s = make_policy(policy, num_blocks=10, num_host_blocks=num_host_blocks, budget=12, clock=lambda: now[0])
    bm = s.block_manager
    live: dict[str, Request] = {}
    for i, (op, pick, n) in enumerate(operations):
        now[0] += 0.1 * n
        names = sorted(live)
        target = live[names[pick % len(names)]] if names else None
        if op == "add":
            live[f"r{i}"] = r = req(f"r{i}", n, max_tokens=1 + n % 6)
            s.add(r)
        elif op == "step":
            run_step(s, token=EOS if n % 9 == 0 else 3)
        elif op == "abort" and target:
            s.finish(target, FinishCause.ABORT)
        elif op == "pause" and target and target.state is RequestState.RUNNING:
            s.pause_for_tool(target, declared_s=float(n % 4))
        elif (
            op == "resume"
            and target
            and target.state is RequestState.AWAITING_TOOL
            and target.num_tokens + n % 5 < 60
        ):
            s.resume(target, [9] * (n % 5))
        live = {k: r for k, r in live.items() if not r.finished}
        assert sum(b.ref_count for b in bm.blocks) == sum(len(r.block_table) for r in live.values())
        assert bm.num_host_blocks - bm.num_free_host_blocks == sum(
            len(r.host_block_table) for r in live.values()
        )
        assert all(not (r.block_table and r.host_block_table) for r in live.values())
    for r in list(live.values()):
        s.finish(r, FinishCause.ABORT)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
