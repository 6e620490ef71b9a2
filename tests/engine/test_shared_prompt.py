"""n requests of one prompt (OpenAI's `n`) share its KV: the prefix cache holds the prompt's
full blocks once, even when the n requests arrive together."""

from __future__ import annotations

import pytest

from conveyor.core.request import SamplingParams
from tests.engine.helpers import assert_all_blocks_free, make_engine

PROMPT = list(range(40, 70))  # 30 tokens: 7 full blocks of 4, and a tail
NUM_FULL = (len(PROMPT) - 1) // 4


@pytest.mark.parametrize("budget", [64, 8], ids=["one-chunk", "chunked"])
def test_n_requests_compute_the_prompt_once(tiny_qwen2, budget):
    engine = make_engine(tiny_qwen2, budget=budget, num_blocks=64)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(PROMPT, params, request_id=f"c{i}") for i in range(4)]
    requests = [engine.get_request(i) for i in ids]
    while any(not r.output_token_ids for r in requests):
        engine.step()
    tables = [r.block_table[:NUM_FULL] for r in requests]
    assert all(t == tables[0] for t in tables)  # the same blocks, not copies
    assert engine.block_manager.num_used_blocks == NUM_FULL + len(requests)  # shared blocks + own tails
    computed_prompt = [r.num_computed_total - (len(r.output_token_ids) - 1) for r in requests]
    assert computed_prompt[0] == len(PROMPT)
    assert computed_prompt[1:] == [len(PROMPT) - NUM_FULL * 4] * 3  # only the tail
    outputs = {}
    while engine.has_unfinished:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert {i: o[-1].num_cached_tokens for i, o in outputs.items()} == {
        "c0": 0,
        **{f"c{i}": NUM_FULL * 4 for i in range(1, 4)},
    }
    assert len({tuple(r.output_token_ids) for r in requests}) == 1  # greedy: all the same
    assert_all_blocks_free(engine)


def test_different_prompts_are_not_held_back(tiny_qwen2):
    engine = make_engine(tiny_qwen2, budget=64)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    requests = [engine.get_request(engine.add_request([7 + i] * 20, params)) for i in range(3)]
    engine.step()
    assert all(r.output_token_ids for r in requests)  # one step: nothing shared, nothing waits
