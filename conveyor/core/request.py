"""A request, its state machine, its sampling parameters and how it ends.

Pure Python: the scheduler and block manager work on these objects without torch.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import Any


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued; no KV yet, or preempted (KV dropped, recompute later)
    RUNNING = "running"  # in the batch: prefilling or decoding
    AWAITING_TOOL = (
        "awaiting_tool"  # out of the batch, waiting for tool results (KV kept, swapped or dropped)
    )
    SWAPPED = "swapped"  # tool results in; its KV waits in host memory to be swapped in
    FINISHED = "finished"


class FinishCause(enum.Enum):
    STOP_TOKEN = enum.auto()
    STOP_STRING = enum.auto()
    LENGTH = enum.auto()
    TOOL_CALLS = enum.auto()
    ABORT = enum.auto()
    ERROR = enum.auto()


# The one table from finish cause to the OpenAI-style finish_reason.
FINISH_REASON: dict[FinishCause, str] = {
    FinishCause.STOP_TOKEN: "stop",
    FinishCause.STOP_STRING: "stop",
    FinishCause.LENGTH: "length",
    FinishCause.TOOL_CALLS: "tool_calls",
    FinishCause.ABORT: "abort",
    FinishCause.ERROR: "error",
}


MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's bound for top_logprobs)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The model's log-probability of one sampled token and the ``top`` most likely tokens
    as (token id, log-probability), most likely first (see engine/sampler.py `token_logprobs`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    frequency_penalty: float = 0.0  # OpenAI's: a logit minus count * this, count in the output so far
    presence_penalty: float = 0.0  # minus this once the token is in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for any unusable value."""
        checks = [
            (
                _integer(self.max_tokens) and self.max_tokens > 0,
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
            ),
            (
                _finite(self.temperature) and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
            ),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (
                _integer(self.top_k) and self.top_k >= 0,
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}",
            ),
            (self.seed is None or _integer(self.seed), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                all(_integer(t) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative integers",
            ),
            (
                self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
            ),
            *(
                (_finite(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
                for name, v in (
                    ("frequency_penalty", self.frequency_penalty),
                    ("presence_penalty", self.presence_penalty),
                )
            ),
            (
                isinstance(self.logit_bias, tuple)
                and all(
                    _integer(t) and t >= 0 and _finite(b) and -100 <= b <= 100 for t, b in self.logit_bias
                ),
                "logit_bias maps token ids (integers >= 0) to biases in [-100, 100]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler changes this request's logits before drawing (bias, penalties)."""
        return bool(self.logit_bias or self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows to inf; the result is greedy anyway
        return self.temperature < 1e-5


def _as_tuple(value: object, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValueError(f"{name} must be a value or a list of values, got {value!r}")


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_arrival_counter = itertools.count()


def by_arrival(request: Request) -> int:
    """Sort key of the scheduler's queues: original arrival, first come first served."""
    return request.arrival


def new_arrival() -> int:
    """The next arrival number: requests are served in this order."""
    return next(_arrival_counter)


@dataclass(slots=True, eq=False)
class Request:
    """One generation: its tokens, its KV bookkeeping and where it is in its life.

    ``token_ids`` holds prompt and output tokens alike; ``num_computed_tokens`` of
    them have their KV in the cache. The rest are prefilled (or decoded) next.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = field(default_factory=new_arrival)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # sampled tokens only
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per sampled token, if asked
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of the full blocks
    state: RequestState = RequestState.WAITING
    finish_cause: FinishCause | None = None
    stop_token_ids: frozenset[int] = frozenset()  # the model's EOS ids (unless ignored) and the params'
    num_computed_total: int = 0  # tokens run through the model, recomputes included
    num_preemptions: int = 0
    constraint: Any = None  # the current turn's tools.grammar.Constraint: the runner masks logits by it
    pause_on_stop: bool = False  # a stop token ends the turn, not the request: the engine decides
    # interception (core/intercept.py): where the KV of a request waiting on a tool went
    host_block_table: list[int] = field(default_factory=list)  # blocks swapped out to the host pool
    recompute_until: int = 0  # tokens that had KV before it was dropped: prefilling them again is recompute
    tool: str | None = None  # the tool it waits on, its declared time and when the wait began
    tool_declared_s: float | None = None
    paused_at_s: float = 0.0
    session_id: str | None = None  # the program it belongs to (core/programs.py); None: its own
    queued_at_s: float = 0.0  # when it was queued (the starvation guard of --schedule las)
    # sessions (core/sessions.py): the client's estimate of its tool time after this request, and
    # the retained request whose tokens begin this one's (its KV is handed over)
    client_tool_s: float | None = None
    continues: str | None = None
    client_tools: Any = field(
        default=None, repr=False
    )  # the request's tool options where it offers the client's tools

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON[self.finish_cause] if self.finish_cause else None
