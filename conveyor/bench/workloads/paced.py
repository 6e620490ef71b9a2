"""Paced mode: recorded model outputs replayed through the engine loop on a fixed decode clock.

`Replay` is a request's per-turn constraint that holds the recorded tokens of one model
turn; `PacedRunner` stands in for ModelRunner (`LLMEngine(runner_factory=...)`): it runs no
forward pass, returns each sampling chunk's next recorded token, and sleeps until the step
has taken `token_latency_ms` plus `prefill_ms_per_token` for each prompt token it carries, on
top of the engine's own time between steps. Everything else (scheduler, detokenizer, parsers, executor, tool workers, tool rounds, the
model's tokenizer and chat template) is the real engine: the tools see the stream timing of
a GPU server. This is an emulation of the decode clock, and is labelled as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Replay:
    """The recorded tokens of one model turn, as a logits constraint (the tests script tiny
    models' tool calls with it): `fill_mask` allows only the next token, so a real runner
    samples it too, and `try_accept` takes only that token."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = list(token_ids)
        self.position = 0

    @property
    def active(self) -> bool:
        return self.position < len(self.token_ids)

    def next_token(self) -> int:
        return self.token_ids[self.position]

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        token = self.next_token()
        bitmask[row].zero_()
        bit = token % 32
        bitmask[row, token // 32] = -(2**31) if bit == 31 else 1 << bit

    def try_accept(self, token: int) -> bool:
        if token != self.next_token():
            return False
        self.position += 1
        return True

    def accept(self, token: int) -> None:
        if token != self.next_token():
            raise ValueError(f"replay expected token {self.next_token()}, got {token}")
        self.position += 1


def replay_factory(turns: list[list[int]]) -> Any:
    """The `constraint=` argument of add_request: turn n replays `turns[n]`."""
    return lambda n: Replay(turns[n]) if n < len(turns) else Replay([])


@dataclass(frozen=True, slots=True)
class Pace:
    """The emulated decode clock."""

    token_latency_ms: float = 20.0  # one decode step (batch 1)
    prefill_ms_per_token: float = 0.1  # each prompt token a step prefills


class PacedRunner:
    """ModelRunner's interface without a model (see the module docstring). A request whose
    replay has run out (or has none) gets the end-of-turn token."""

    def __init__(self, pace: Pace, eos_token_id: int, model_dir: Path, num_blocks: int) -> None:
        from conveyor.engine.model.llama import ModelArgs

        self.pace = pace
        self.eos_token_id = eos_token_id
        self.args = ModelArgs.from_dir(model_dir)
        self.num_blocks = num_blocks
        self._deadline: float | None = None  # when the last step's emulated time was up
        self._returned = 0.0  # when the last step actually returned

    @classmethod
    def factory(cls, pace: Pace, eos_token_id: int, num_blocks: int = 4096) -> Any:
        """A `runner_factory` for LLMEngine."""
        return lambda model_config, cache_config, model_dir: cls(
            pace, eos_token_id, model_dir, cache_config.num_blocks or num_blocks
        )

    def execute(self, out: Any) -> list[int | None]:
        """The step's tokens, returned when the step's emulated time is up: the previous step's
        deadline, plus the engine's own time since that step returned, plus this step's cost.
        The OS waking the sleeper late is thus caught up on the next step, not accumulated."""
        now = time.perf_counter()
        tokens: list[int | None] = []
        for chunk in out.chunks:
            tokens.append(self._next(chunk.request) if chunk.sample else None)
        num_prefill = sum(c.num_tokens for c in out.chunks if c.num_tokens > 1)
        cost_s = (self.pace.token_latency_ms + self.pace.prefill_ms_per_token * num_prefill) / 1000
        base = now if self._deadline is None else self._deadline + (now - self._returned)
        self._deadline = base + cost_s
        _sleep_until(self._deadline)
        self._returned = time.perf_counter()
        return tokens

    def _next(self, request: Any) -> int:
        replay = request.constraint
        if not isinstance(replay, Replay) or not replay.active:
            return self.eos_token_id
        token = replay.next_token()
        replay.accept(token)
        return token

    # the KV swap interface of ModelRunner: no memory to move
    def init_host_pool(self, cache_config: Any) -> int:
        return 0

    def time_block_copy(self) -> float:
        return 0.0

    def swap(self, swaps: list[Any]) -> None:
        """Nothing to copy."""


def _sleep_until(deadline: float) -> None:
    """Sleep, then spin the last half millisecond (sleep overshoots by up to a tick)."""
    remaining = deadline - time.perf_counter()
    if remaining > 0.001:
        time.sleep(remaining - 0.0005)
    while time.perf_counter() < deadline:
        pass
