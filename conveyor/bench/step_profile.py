"""Where a decode step's time goes: matmuls, attention, other ops, and Python around them."""

from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile

from conveyor.core.request import SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.engine.model.linear import Linear
from conveyor.engine.model.qlinear import QuantLinear


def profile_decode(engine: LLMEngine, concurrency: int, steps: int = 20) -> dict[str, float]:
    """Milliseconds per decode step at ``concurrency``, split by part of the forward pass.

    Matmul time comes from hooks on every ``Linear`` and ``QuantLinear`` (our kernel or oneDNN inside); attention
    (KV write, block gather, SDPA) from the profiler's self times, which it inflates a little;
    "other" is the rest: norms, RoPE, sampling, scheduling and Python."""
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    requests = [
        engine.get_request(engine.add_request(f"Write a story about the number {i}.", params))
        for i in range(concurrency)
    ]
    while any(not r.output_token_ids for r in requests):  # prefill done: every later step decodes
        engine.step()
    linear_s = [0.0]
    started: list[float] = []
    hooks = []
    for m in engine.runner.model.modules():
        if isinstance(m, (Linear, QuantLinear)):
            hooks.append(m.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())))
            hooks.append(
                m.register_forward_hook(
                    lambda *_: linear_s.__setitem__(0, linear_s[0] + time.perf_counter() - started.pop())
                )
            )
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - start) / steps
    for h in hooks:
        h.remove()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps // 4):
            engine.step()
    attention_ms = sum(
        e.self_cpu_time_total
        for e in prof.key_averages()
        if "scaled_dot_product" in e.key or e.key in ("aten::index", "aten::index_copy_")
    )
    while engine.has_unfinished:
        engine.step()
    linear_ms = linear_s[0] / steps * 1e3
    attention_ms = attention_ms / 1e3 / (steps // 4)
    step_ms = step_s * 1e3
    return {
        "concurrency": concurrency,
        "step_ms": step_ms,
        "linear_ms": linear_ms,
        "attention_ms": attention_ms,
        "other_ms": step_ms - linear_ms - attention_ms,
    }
