"""Intercept policies on a real (tiny) model: swapped KV is bit-identical, and a request whose KV
was swapped, discarded or turned into a new request continues exactly like an undisturbed one."""

from __future__ import annotations

import pytest
import torch

from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from conveyor.core.request import Request, SamplingParams
from conveyor.engine.engine import LLMEngine
from tests.engine.helpers import assert_all_blocks_free

PROMPT = list(range(1, 23))
PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)
APPENDED = [50, 51, 52, 53, 54]


def make(model_dir, policy: str, num_blocks: int = 64, prefix_caching: bool = False) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),
        cache=CacheConfig(
            num_blocks=num_blocks, block_size=4, num_host_blocks=32, prefix_caching=prefix_caching
        ),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, intercept=policy),
    )
    return LLMEngine(config, progress=False)


def run_with_pause(engine: LLMEngine, check_paused=lambda request: None) -> Request:
    """Decode 4 tokens, wait on a 'tool' for two steps, resume with APPENDED, run to the end."""
    rid = engine.add_request(PROMPT, PARAMS)
    request = engine.get_request(rid)
    while len(request.output_token_ids) < 4:
        engine.step()
    engine.pause_for_tool(rid, tool="t", declared_s=100.0)
    engine.step()
    engine.step()
    check_paused(request)
    engine.resume(rid, APPENDED)
    while not request.finished:
        engine.step()
    assert_all_blocks_free(engine)
    assert engine.block_manager.num_free_host_blocks == engine.block_manager.num_host_blocks
    return request


@pytest.fixture(scope="module")
def undisturbed(tiny_llama) -> list[int]:
    return run_with_pause(make(tiny_llama, "preserve")).output_token_ids


@pytest.mark.parametrize("policy, kv_left", [("swap", "host"), ("discard", "none"), ("new-request", "none")])
def test_policy_continues_exactly_like_an_undisturbed_request(
    tiny_llama, undisturbed, policy, kv_left
) -> None:
    def check(request) -> None:
        assert request.block_table == []
        assert bool(request.host_block_table) == (kv_left == "host")

    assert run_with_pause(make(tiny_llama, policy), check).output_token_ids == undisturbed


def test_new_request_continuation_prefills_what_the_prefix_cache_lost(tiny_llama) -> None:
    """With the prefix cache on, the new-request continuation (like a discarded request) adopts
    its own freed blocks back, as today's servers' prefix caches do; without the cache it
    prefills its whole context (22 + 4 + 5 tokens) again."""
    before_pause, after = len(PROMPT) + 3, PARAMS.max_tokens - 4 - 1
    for policy in ("new-request", "discard"):
        cached = run_with_pause(make(tiny_llama, policy, prefix_caching=True))
        assert cached.num_computed_total == before_pause + 7 + after, policy  # 24 tokens from the cache
    uncached = run_with_pause(make(tiny_llama, "new-request"))
    assert uncached.num_computed_total == before_pause + len(PROMPT) + 4 + len(APPENDED) + after


def test_swap_out_then_in_gives_bit_identical_kv(tiny_llama) -> None:
    engine = make(tiny_llama, "swap")
    rid = engine.add_request(PROMPT, PARAMS)
    request = engine.get_request(rid)
    while len(request.output_token_ids) < 4:
        engine.step()
    engine.pause_for_tool(rid)
    kv, host = engine.runner.kv, engine.runner.host_kv
    n = request.num_computed_tokens
    before = kv[:, :, request.block_table].flatten(2, 3)[:, :, :n].clone()
    engine.step()  # swapped out
    assert request.block_table == []
    assert torch.equal(host[:, :, request.host_block_table].flatten(2, 3)[:, :, :n], before)
    kv.fill_(float("nan"))  # whatever the device pool holds now
    engine.resume(rid, APPENDED)
    engine.step()  # swapped in, then the appended tokens run
    assert request.host_block_table == []
    assert torch.equal(kv[:, :, request.block_table].flatten(2, 3)[:, :, :n], before)
    engine.abort(rid)
    assert_all_blocks_free(engine)


def test_preempting_running_requests_by_swap_keeps_their_greedy_output(tiny_llama) -> None:
    """Three requests on a pool too small for all of them: the swap policy preempts the newest
    running one by swapping it out, and every request ends as it does with room to spare."""
    prompts = [[7 + i, *PROMPT[i:]] for i in range(3)]

    def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        engine = make(tiny_llama, "swap", num_blocks=num_blocks)
        requests = [engine.get_request(engine.add_request(p, PARAMS)) for p in prompts]
        while engine.has_unfinished:
            engine.step()
        assert_all_blocks_free(engine)
        assert engine.block_manager.num_free_host_blocks == engine.block_manager.num_host_blocks
        assert all(r.num_computed_total == len(r.prompt_token_ids) + PARAMS.max_tokens - 1 for r in requests)
        return [r.output_token_ids for r in requests], sum(r.num_preemptions for r in requests)

    roomy, tight = outputs(64), outputs(16)
    assert roomy[1] == 0 and tight[1] > 0  # the tight pool did preempt
    assert tight[0] == roomy[0]
