"""A constraint that forces a scripted token sequence: tiny random models then "write" tool calls."""
from __future__ import annotations

import torch


class Scripted:
    """Forces `token_ids` one by one (the engine samples exactly them), then lets go."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = list(token_ids)
        self.position = 0

    @property
    def active(self) -> bool:
        return self.position < len(self.token_ids)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        token = self.token_ids[self.position]
        bitmask[row].zero_()
        bit = token % 32
        bitmask[row, token // 32] = -(2**31) if bit == 31 else 1 << bit

    def try_accept(self, token: int) -> bool:
        if token != self.token_ids[self.position]:
            return False
        self.position += 1
        return True

    def accept(self, token: int) -> None:
        assert token == self.token_ids[self.position], "the scripted token was not sampled"
        self.position += 1


def script(engine, text: str) -> Scripted:
    """Force `text` followed by the end-of-turn token."""
    ids = engine.tokenizer.encode(text, add_special_tokens=False) + [engine.tokenizer.eos_token_id]
    return Scripted(ids)
