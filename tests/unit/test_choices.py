"""server/choices.py: interleaving choice streams, seeds and usage of several choices."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.server.choices import choice_seed, interleave, total_usage


def _streams(closed: list[int], fail_after: int | None = None):
    gate = asyncio.Event()  # never set: a stream waits here after its first items

    async def stream(i: int):
        try:
            yield f"{i}a"
            if i == fail_after:
                raise RuntimeError(f"stream {i} failed")
            await gate.wait()
            yield f"{i}b"
        finally:
            closed.append(i)

    return [stream(i) for i in range(3)]


def test_closing_early_closes_every_stream():
    closed: list[int] = []

    async def main() -> list:
        merged = interleave(_streams(closed))
        got = [await anext(merged) for _ in range(3)]
        await merged.aclose()
        return got

    assert sorted(asyncio.run(main())) == [(0, "0a"), (1, "1a"), (2, "2a")]
    assert sorted(closed) == [0, 1, 2]


def test_a_failure_is_raised_and_closes_the_others():
    closed: list[int] = []

    async def main() -> None:
        async for _ in interleave(_streams(closed, fail_after=1)):
            pass

    with pytest.raises(RuntimeError, match="stream 1 failed"):
        asyncio.run(main())
    assert sorted(closed) == [0, 1, 2]


def test_choice_seeds_differ_and_choice_0_keeps_the_seed():
    seeds = [choice_seed(7, i) for i in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seed(None, 3) is None


def test_usage_counts_each_prompt_once():
    usages = [{"prompt_tokens": 5, "completion_tokens": c} for c in (1, 2)] + [
        {"prompt_tokens": 9, "completion_tokens": c} for c in (3, 4)
    ]
    assert total_usage(usages, [0, 2]) == {"prompt_tokens": 14, "completion_tokens": 10, "total_tokens": 24}
