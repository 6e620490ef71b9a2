"""Building engines and Hugging Face references over the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from conveyor.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ToolConfig,
)
from conveyor.core.request import Request, SamplingParams
from conveyor.core.step_plan import Chunk, SchedulerOutput
from conveyor.engine.engine import LLMEngine


def make_engine(
    model_dir: Path,
    *,
    dtype: str = "float32",
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 16,
    max_seqs: int = 8,
    prefix_caching: bool = True,
    tools: ToolConfig = ToolConfig(),
    linear_kernel: str = "auto",
    device: str = "cpu",
    weights: str = "auto",
    quant_kernel: str = "auto",
    quant_activations: str = "int8",
) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(
            model=str(model_dir),
            dtype=dtype,
            linear_kernel=linear_kernel,
            device=device,
            weights=weights,
            quant_kernel=quant_kernel,
            quant_activations=quant_activations,
        ),
        cache=CacheConfig(num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        tools=tools,
    )
    return LLMEngine(config, progress=False)


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, dtype=torch.float32) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_used_blocks} blocks still in use"


def prompt_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Float32 logits of the prompt's last position, computed through the engine's paged path."""
    request = Request("probe", prompt, SamplingParams())
    assert engine.block_manager.try_allocate(request, len(prompt))
    try:
        return engine.runner.forward(SchedulerOutput([Chunk(request, 0, len(prompt), True)]))[0][0]
    finally:
        engine.block_manager.free(request)


def drain(engine, request_id: str) -> list:
    """Step until the engine is idle; the outputs, all of which must be `request_id`'s."""
    outputs = []
    while engine.has_unfinished:
        for out in engine.step():
            assert out.request_id == request_id
            outputs.append(out)
    return outputs


def text_of(outputs) -> str:
    return "".join(o.new_text for o in outputs)


def results_of(outputs) -> list[str]:
    return [r.content for o in outputs for r in o.tool_results]
