"""Block manager: allocation, reference counts, prefix caching, no leaks or double frees."""

from __future__ import annotations

import pytest

from conveyor.core.block_manager import BlockManager
from conveyor.core.request import Request, SamplingParams


def make_request(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, list(tokens), SamplingParams())


def test_allocate_covers_tokens_and_free_returns_all() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    r = make_request(list(range(10)))
    assert bm.try_allocate(r, 10)
    assert len(r.block_table) == 3 and bm.num_used_blocks == 3
    r.num_computed_tokens = 10
    assert bm.try_allocate(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_table) == 3
    assert bm.try_allocate(r, 3)  # 13 need a fourth
    assert len(r.block_table) == 4
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_table == []


def test_all_or_nothing_when_pool_is_short() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    r = make_request(list(range(12)))
    assert not bm.try_allocate(r, 12)
    assert r.block_table == [] and bm.num_free_blocks == 2


def test_double_free_is_an_error() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    r = make_request([1, 2, 3])
    bm.try_allocate(r, 3)
    table = list(r.block_table)
    bm.free(r)
    r.block_table = table
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(r)


def test_prefix_cache_shares_full_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request(list(range(9)), "a")
    assert bm.try_allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_full_blocks(a)
    assert bm.num_cached_blocks == 2
    b = make_request(list(range(8)) + [99, 100], "b")
    prefix = bm.lookup_prefix(b.token_ids)
    assert prefix == a.block_table[:2]
    assert bm.try_allocate(b, 2, prefix)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # a prompt of exactly two cached blocks still computes its last token
    c = make_request(list(range(8)), "c")
    assert len(bm.lookup_prefix(c.token_ids)) == 1
    bm.free(a), bm.free(b)
    assert bm.num_free_blocks == 8


def test_freed_blocks_stay_adoptable_until_reused() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_request([1, 2, 3, 4, 5], "a")
    bm.try_allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 2
    assert len(bm.lookup_prefix([1, 2, 3, 4, 9])) == 2
    other = make_request([7] * 6, "o")
    bm.try_allocate(other, 6)  # takes every block: cached ones are evicted
    assert bm.lookup_prefix([1, 2, 3, 4, 9]) == [] and bm.num_cached_blocks == 0


def test_prefix_caching_off() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    a = make_request([1, 2, 3], "a")
    bm.try_allocate(a, 3)
    a.num_computed_tokens = 3
    bm.register_full_blocks(a)
    assert bm.lookup_prefix([1, 2, 3]) == [] and bm.num_cached_blocks == 0


def test_swap_out_and_in_move_blocks_between_pools() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, num_host_blocks=3)
    a = make_request([1, 2, 3, 4, 5], "a")
    bm.try_allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    device = list(a.block_table)
    out = bm.swap_out(a)
    assert [d for d, _ in out] == device and a.block_table == [] and len(a.host_block_table) == 3
    assert bm.num_free_blocks == 4 and bm.num_free_host_blocks == 0
    b = make_request([9] * 8, "b")
    assert bm.swap_out(b) == [] and bm.try_allocate(b, 8)  # b takes every device block
    assert bm.swap_in(a) is None  # no room: nothing changes
    assert len(a.host_block_table) == 3 and bm.num_free_host_blocks == 0
    assert bm.swap_out(b) is None  # the host pool is full
    bm.free(b)
    back = bm.swap_in(a)
    assert [h for h, _ in back] == [h for _, h in out] and a.block_table == [d for _, d in back]
    assert bm.num_free_host_blocks == 3 and len(a.block_hashes) == 2  # full blocks registered again
    bm.free(a)
    assert bm.num_free_blocks == 4


def test_free_releases_host_blocks_and_shared_blocks_survive_a_swap() -> None:
    bm = BlockManager(num_blocks=6, block_size=2, num_host_blocks=4)
    a = make_request([1, 2, 3, 4, 5], "a")
    bm.try_allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    b = make_request([1, 2, 3, 4, 7], "b")
    bm.try_allocate(b, 1, bm.lookup_prefix(b.token_ids))  # shares a's two full blocks
    shared = b.block_table[:2]
    bm.swap_out(a)
    assert all(bm.blocks[i].ref_count == 1 for i in shared)  # still b's
    bm.free(a)
    assert bm.num_free_host_blocks == 4 and a.host_block_table == []
    bm.free(b)
    assert bm.num_free_blocks == 6
