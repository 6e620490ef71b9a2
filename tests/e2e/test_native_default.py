"""The default model (Qwen2.5-Coder-0.5B, Q4_K_M GGUF) on native weights: greedy tokens equal
those of a reference that de-quantizes every weight to fp32 and runs our model in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conveyor.core.request import SamplingParams
from conveyor.engine.model.llama import CausalLM
from conveyor.engine.model.loader import resolve_model
from conveyor.engine.model.qlinear import QuantLinear
from tests.engine.helpers import assert_all_blocks_free, make_engine

PROMPTS = [
    "Write a python function that reverses a string.",
    "What is a paged KV cache?",
    "List three uses of a hash map.",
]


@pytest.fixture(scope="module")
def native_dir() -> Path:
    return resolve_model("default", weights="native", progress=False)


def greedy(engine, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    requests = engine.generate(prompts, SamplingParams(max_tokens=num_tokens, ignore_eos=True))
    return [r.output_token_ids for r in requests]


def test_native_greedy_tokens_equal_the_fp32_dequantized_reference(native_dir: Path) -> None:
    """The KV cache is fp32 on both sides, so only the products' accumulation order differs."""
    engine = make_engine(
        native_dir, weights="native", dtype="float32", num_blocks=64, block_size=16, budget=256
    )
    assert sum(isinstance(m, QuantLinear) for m in engine.runner.model.modules()) == 24 * 4 + 1
    prompts = [engine.encode([{"role": "user", "content": text}]) for text in PROMPTS]
    native = [greedy(engine, [p], 32)[0] for p in prompts]
    assert_all_blocks_free(engine)
    reference = CausalLM(engine.runner.args, torch.float32, torch.float32)
    with torch.inference_mode():
        reference.load(native_dir, native=False)
    engine.runner.model = reference  # F.linear in fp32 on the de-quantized weights
    want = [greedy(engine, [p], 32)[0] for p in prompts]
    for text, got, ref in zip(PROMPTS, native, want):
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        assert first is None, f"{text!r}: native diverges from the fp32 reference at token {first}"
