"""The CUDA path: same greedy tokens as the CPU fp32 path, bit-exact swaps, and a KV cache sized from
the device's free memory. The first two need a GPU; the sizing arithmetic runs anywhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conveyor.config import CacheConfig
from conveyor.core.request import SamplingParams
from conveyor.core.step_plan import Swap
from conveyor.engine.runner import ModelRunner
from tests.engine.helpers import assert_all_blocks_free, make_engine

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], list(range(10, 47)), [5]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@needs_gpu
@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_cuda_greedy_equals_cpu_fp32(family: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(family)
    cpu = [r.output_token_ids for r in make_engine(model_dir).generate(PROMPTS, GREEDY)]
    engine = make_engine(model_dir, device="cuda")
    assert engine.runner.kv.is_cuda
    assert [r.output_token_ids for r in engine.generate(PROMPTS, GREEDY)] == cpu
    assert_all_blocks_free(engine)


@needs_gpu
def test_cuda_swap_out_and_in_is_bit_exact(tiny_llama) -> None:
    runner = make_engine(tiny_llama, device="cuda", dtype="bfloat16").runner
    assert runner.host_kv.is_pinned()
    runner.kv.copy_(torch.randn(runner.kv.shape, device="cuda").to(runner.kv.dtype))
    before = runner.kv[:, :, [3, 5, 7]].clone()
    runner.swap([Swap(True, [(3, 0), (5, 1), (7, 2)])])
    runner.kv[:, :, [3, 5, 7]] = 0  # the freed device blocks get reused meanwhile
    runner.swap([Swap(False, [(0, 10), (1, 11), (2, 12)])])
    assert torch.equal(runner.kv[:, :, [10, 11, 12]], before)


def test_cuda_kv_cache_takes_what_the_weights_leave_of_the_utilization(monkeypatch) -> None:
    runner = SimpleNamespace(device=torch.device("cuda"), _block_bytes=lambda: 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * 2**30, 40 * 2**30))
    blocks = ModelRunner._blocks_for_memory(runner, CacheConfig(gpu_memory_utilization=0.9))
    assert blocks == (30 - 4) * 1024  # 30 GiB free, 4 GiB (10% of 40) left unused
    with pytest.raises(ValueError, match="no GPU memory left for the KV cache"):
        ModelRunner._blocks_for_memory(runner, CacheConfig(gpu_memory_utilization=0.2))
    cpu = SimpleNamespace(device=torch.device("cpu"), _block_bytes=lambda: 2**20)
    assert ModelRunner._blocks_for_memory(cpu, CacheConfig(kv_cache_mb=64)) == 64
