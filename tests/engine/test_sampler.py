"""The sampler's constrained path: a grammar is asked first and the mask is built only when it
refuses, which must give exactly what masking first gives (greedy) or the same distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conveyor.core.request import SamplingParams
from conveyor.engine.sampler import Sampler

VOCAB = 40
LOGITS = torch.linspace(-2.0, 2.0, VOCAB)  # token 39 is the unmasked favourite


class AllowSet:
    """A constraint that allows the same tokens at every position (`fast`: has try_accept)."""

    def __init__(self, allowed: set[int], fast: bool = True, top: bool = False) -> None:
        self.allowed, self.taken = allowed, []
        if fast:
            self.try_accept = self._try_accept
        if top:  # a masked argmax that finds the best allowed of the 16 highest logits, or gives up
            self.masked_argmax = lambda row: next(
                (t for t in row.topk(16).indices.tolist() if t in self.allowed), None
            )

    active = True

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        for token in self.allowed:
            bit = token % 32
            bitmask[row, token // 32] |= -(2**31) if bit == 31 else 1 << bit

    def _try_accept(self, token: int) -> bool:
        if token in self.allowed:
            self.taken.append(token)
        return token in self.allowed

    def accept(self, token: int) -> None:
        assert token in self.allowed, f"{token} was sampled outside the allowed set"
        self.taken.append(token)


def sample(sampler: Sampler, params: SamplingParams, constraint: AllowSet, position: int = 0) -> int:
    return sampler(LOGITS.clone().unsqueeze(0), [params], [position], [constraint])[0]


@pytest.mark.parametrize("allowed", [{39, 3}, {3, 4, 5}, {0}])
def test_greedy_equals_masked_argmax(allowed) -> None:
    sampler = Sampler(torch.device("cpu"))
    constraint = AllowSet(allowed)
    assert sample(sampler, SamplingParams(), constraint) == max(allowed) == constraint.taken[0]
    assert sampler.constraint_stats.num_tokens == 1
    assert sampler.constraint_stats.num_masked == (0 if 39 in allowed else 1)


@pytest.mark.parametrize("allowed, num_masked", [({36, 30}, 0), ({3, 30}, 0), ({3, 4}, 1)])
def test_a_refused_greedy_row_takes_the_constraints_masked_argmax_without_a_mask(allowed, num_masked) -> None:
    sampler = Sampler(torch.device("cpu"))
    constraint = AllowSet(allowed, top=True)
    assert sample(sampler, SamplingParams(), constraint) == max(allowed) == constraint.taken[0]
    stats = sampler.constraint_stats
    assert (stats.num_refused, stats.num_masked) == (1, num_masked)  # 16 candidates: tokens 39..24


def test_a_refused_sampling_row_is_masked_even_when_top_logits_are_offered() -> None:
    """The shortcut is greedy's: a draw restricted to the top logits would not be p(x)/p(A) on A."""
    sampler = Sampler(torch.device("cpu"))
    allowed = {3, 30}
    for position in range(40):
        constraint = AllowSet(allowed, top=True)
        constraint.masked_argmax = lambda row: pytest.fail("a sampling row took the greedy shortcut")
        assert sample(sampler, SamplingParams(temperature=1.0, seed=1), constraint, position) in allowed
    stats = sampler.constraint_stats
    assert 0 < stats.num_refused == stats.num_masked  # every refused draw was masked and drawn again


def test_temperature_draws_follow_the_masked_distribution() -> None:
    sampler = Sampler(torch.device("cpu"))
    allowed = {20, 30, 36, 39}
    draws = Counter(
        sample(sampler, SamplingParams(temperature=1.0, seed=7), AllowSet(allowed), position)
        for position in range(3000)
    )
    probs = torch.softmax(LOGITS, -1)
    masked = {t: float(probs[t] / probs[list(allowed)].sum()) for t in allowed}
    assert set(draws) <= allowed
    for token, p in masked.items():  # 3000 draws: 4 sigma is at most 0.037
        assert abs(draws[token] / 3000 - p) < 0.04, (token, draws[token] / 3000, p)
    stats = sampler.constraint_stats
    assert 0 < stats.num_masked < stats.num_tokens == 3000  # both paths were taken


def test_seeded_draws_repeat() -> None:
    params = SamplingParams(temperature=0.9, seed=3)
    first = [sample(Sampler(torch.device("cpu")), params, AllowSet({5, 6, 39}), p) for p in range(50)]
    again = [sample(Sampler(torch.device("cpu")), params, AllowSet({5, 6, 39}), p) for p in range(50)]
    assert first == again


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_k=5)]
)
def test_cuts_and_constraints_without_try_accept_always_mask(params) -> None:
    for constraint, sampling in (
        (AllowSet({39, 38}), params),
        (AllowSet({39, 38}, fast=False), SamplingParams()),
    ):
        sampler = Sampler(torch.device("cpu"))
        token = sample(sampler, sampling, constraint)
        assert token in {38, 39} and constraint.taken == [token]
        assert sampler.constraint_stats.num_masked == 1


def test_free_rows_are_untouched() -> None:
    sampler = Sampler(torch.device("cpu"))
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    tokens = sampler(logits, [SamplingParams(), SamplingParams()], [0, 0], [AllowSet({3}), None])
    assert tokens == [3, 0]
    assert sampler.constraint_stats.num_tokens == 1
