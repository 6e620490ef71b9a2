"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; grammar constraints.

A seeded request draws each token from a generator seeded by (seed, output
position), so its tokens do not depend on which other requests share the batch.

Rows of requests with an active grammar constraint (an object with `active`,
`fill_mask(bitmask, row)`, `accept(token)` and optionally `try_accept(token) -> bool`)
are sampled *before* masking when masking cannot change the outcome's distribution:
greedy rows and plain-temperature rows (no top-k/top-p cut). If the grammar accepts the
token (`try_accept`), that is the token; when it refuses, a greedy row whose constraint
has `masked_argmax(row_logits)` takes the masked argmax it computes without masking the
row (masking costs ~1 ms a row on a CPU; reading the allowed ids of one bitmask row costs
tens of µs); only where that returns None, or the row samples, is the row masked and drawn
again. Exact: greedy picks the masked argmax either way; a draw
from p kept when allowed, else redrawn (with a fresh seed stream) from p restricted to the
allowed set A, is distributed as p(x)/p(A) on A.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from conveyor.core.request import SamplingParams, TokenLogprobs

REDRAW_SALT = 0x5EED_0F_6EA6  # a redraw after masking uses its own seed stream


@dataclass(slots=True)
class ConstraintStats:
    """Constrained tokens sampled so far, how many needed the mask, and the time spent on
    constraints (accept checks, masks, redraws) in seconds."""

    num_tokens: int = 0
    num_refused: int = 0  # the grammar refused the unmasked token
    num_masked: int = 0  # of those, the ones that needed the whole mask
    seconds: float = 0.0


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self._generator = torch.Generator(device=device)
        self._mask = GrammarMask()
        self.constraint_stats = ConstraintStats()

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        positions: list[int],
        constraints: list[Any] | None = None,
        outputs: list[list[int]] | None = None,
    ) -> list[int]:
        """One token per row of ``logits`` [rows, vocab]; ``positions`` are the rows' output
        indices; ``constraints`` (None entries for free rows) restrict rows and advance;
        ``outputs`` are the rows' output tokens so far (the penalties count them)."""
        adjust_logits(logits, params, outputs)
        rows = [(row, c) for row, c in enumerate(constraints or ()) if c is not None and c.active]
        mask_first = {row for row, _ in rows if not _unmasked_is_exact(params[row])}  # no draw to waste
        tokens = self._draw(logits, params, positions, skip=mask_first)
        if rows:
            self._constrain(logits, params, positions, rows, tokens)
        return tokens

    def _draw(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        positions: list[int],
        salt: int = 0,
        skip: set[int] | frozenset[int] = frozenset(),
    ) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if not p.greedy and i not in skip:
                tokens[i] = self._sample_row(logits[i], p, positions[i], salt)
        return tokens

    def _constrain(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        positions: list[int],
        rows: list[tuple[int, Any]],
        tokens: list[int],
    ) -> None:
        """Keep each row's token if its grammar takes it (where that is exact), else mask and redraw."""
        start = time.perf_counter()
        masked = [
            (row, c)
            for row, c in rows
            if not (_unmasked_is_exact(params[row]) and _try_accept(c, tokens[row]))
        ]
        num_refused = len(masked)
        masked = [
            (row, c) for row, c in masked if not self._best_allowed(logits[row], params[row], c, tokens, row)
        ]
        if masked:
            indices = [row for row, _ in masked]
            self._mask.apply(logits, indices, [c for _, c in masked])
            redrawn = self._draw(
                logits[indices], [params[i] for i in indices], [positions[i] for i in indices], REDRAW_SALT
            )
            for (row, constraint), token in zip(masked, redrawn):
                tokens[row] = token
                constraint.accept(token)
        stats = self.constraint_stats
        stats.num_tokens += len(rows)
        stats.num_refused += num_refused
        stats.num_masked += len(masked)
        stats.seconds += time.perf_counter() - start

    @staticmethod
    def _best_allowed(
        row_logits: torch.Tensor, p: SamplingParams, constraint: Any, tokens: list[int], row: int
    ) -> bool:
        """A greedy row: its token is the constraint's masked argmax, where it has a cheap one (see the module docstring)."""
        masked_argmax = getattr(constraint, "masked_argmax", None)
        if not p.greedy or masked_argmax is None:
            return False
        token = masked_argmax(row_logits)
        if token is None:
            return False
        tokens[row] = token
        constraint.accept(token)
        return True

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int, salt: int = 0) -> int:
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
            generator.manual_seed(((p.seed * 1_000_003 + position) ^ salt) % (2**63))
        return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()  # the logits are an inference tensor: updated in place only in that mode
def adjust_logits(
    logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None
) -> None:
    """OpenAI's logit_bias and penalties, in place, on the rows whose params set them: a token's
    logit plus its bias, minus count * frequency_penalty and, if count > 0, presence_penalty,
    where count is how often it is in the row's output so far. A few tensor operations per such
    row over the tokens its output holds, none over the vocabulary; other rows are not touched."""
    for row, p in enumerate(params):
        if not p.adjusts_logits:
            continue
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            logits[row, list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        output = outputs[row] if outputs else []
        if output and (p.frequency_penalty or p.presence_penalty):  # only the tokens in the output
            ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty


class ModelLogprobs:
    """Log-probabilities for the rows whose requests ask for them (`SamplingParams.logprobs`).

    They are the model's own distribution: a log-softmax of the raw logits, before temperature,
    top-k / top-p and grammar masks, as OpenAI and vLLM (by default) report them, so a value does
    not depend on how the token was drawn. Taken before sampling, because a constrained row's
    logits are masked in place; one log-softmax and one top-k over the asking rows, no Python
    loop over the vocabulary."""

    def __init__(self, logits: torch.Tensor, num_top: list[int | None]) -> None:
        self.rows = [row for row, k in enumerate(num_top) if k is not None]
        self.num_top = [num_top[row] or 0 for row in self.rows]
        self.values = torch.log_softmax(logits[self.rows].float(), dim=-1) if self.rows else None

    def of(self, tokens: list[int]) -> list[tuple[int, TokenLogprobs]]:
        """(row, the sampled token's logprobs) for each asking row; `tokens` has one per row."""
        if self.values is None:
            return []
        chosen_ids = torch.tensor([tokens[row] for row in self.rows], device=self.values.device)
        chosen = self.values.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = self.values.topk(max(self.num_top), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        return [
            (row, TokenLogprobs(tokens[row], chosen[i], tuple(zip(top_ids[i][:k], top_values[i][:k]))))
            for i, (row, k) in enumerate(zip(self.rows, self.num_top))
        ]


def _unmasked_is_exact(p: SamplingParams) -> bool:
    """Whether sampling before masking keeps the masked distribution (see the module docstring):
    a top-k or top-p cut taken before the mask would cut a different set."""
    return p.greedy or (p.top_k == 0 and p.top_p >= 1.0)


def _try_accept(constraint: Any, token: int) -> bool:
    try_accept = getattr(constraint, "try_accept", None)  # optional: without it, always mask
    return try_accept is not None and try_accept(token)


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
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=logits.shape[1], indices=rows
        )
