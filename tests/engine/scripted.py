"""Scripted turns: tiny random models "write" tool calls by a constraint that forces tokens."""

from __future__ import annotations

from conveyor.bench.workloads.paced import Replay


def script(engine, text: str) -> Replay:
    """Force `text` followed by the end-of-turn token."""
    ids = engine.tokenizer.encode(text, add_special_tokens=False) + [engine.tokenizer.eos_token_id]
    return Replay(ids)
