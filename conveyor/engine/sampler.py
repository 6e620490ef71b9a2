"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; grammar masks.

A seeded request draws each token from a generator seeded by (seed, output
position), so its tokens do not depend on which other requests share the batch.
Rows of requests with a grammar constraint are masked before sampling.
"""
from __future__ import annotations

from typing import Any

import torch

from conveyor.engine.request import SamplingParams


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self._generator = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
        """One token per row of ``logits`` [rows, vocab]; ``positions`` are the rows' output indices."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, positions[i])
        return tokens

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int) -> int:
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        generator = None
        if p.seed is not None:
            generator = self._generator
            generator.manual_seed((p.seed * 1_000_003 + position) % (2**63))
        return int(torch.multinomial(probs, 1, generator=generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


class GrammarMask:
    """One reusable xgrammar bitmask that masks the logits rows of constrained requests in place."""

    def __init__(self) -> None:
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, rows: list[int], constraints: list[Any]) -> None:
        """Set to -inf the tokens each constraint forbids in its row of ``logits`` [rows, vocab]."""
        import xgrammar as xgr  # only once some request is constrained

        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < logits.shape[0] or bitmask.shape[1] * 32 < logits.shape[1]:
            bitmask = self._bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
        for row, constraint in zip(rows, constraints):
            constraint.fill_mask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=logits.shape[1], indices=rows)
