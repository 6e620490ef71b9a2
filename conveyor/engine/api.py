"""The Engine protocol: what the server, the commands and the benchmarks drive, whichever
engine it is (`LLMEngine`, embedded; `backends.remote.RemoteEngine`), and the plain data that
crosses it. `EngineBase` holds the conveniences written once for both (`stream`, `generate`,
the context manager)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, runtime_checkable

from conveyor.core.request import SamplingParams
from conveyor.core.sessions import follow_up_text
from conveyor.tools.base import ToolResult
from conveyor.tools.driver import Span
from conveyor.tools.workers import WorkerStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A prompt rendered and tokenized ahead of `add_request` (`prepare`, off the engine's
    thread); `prompt` is what the caller gave, `text` the rendered prompt (the remote engine
    sends it)."""

    prompt: str | list[int] | list[dict[str, Any]]
    token_ids: list[int]
    text: str = ""
    continues: str | None = None  # the request whose tokens begin these (a ContinuedChat that matched)


@dataclass(frozen=True, slots=True)
class ContinuedChat:
    """Chat messages whose first `num_reused` ones are a conversation this engine answered:
    `token_ids` are the tokens request `source_id` ended with (prompt, generated tokens, its
    end-of-turn token; a finished output's `final_token_ids`). The engine reuses them and
    renders only the later messages (`core.sessions.follow_up_text`); where the template does
    not allow that, it renders all of `messages`."""

    messages: list[dict[str, Any]]
    num_reused: int
    token_ids: list[int]
    source_id: str


Prompt = str | list[int] | list[dict[str, Any]] | PreparedPrompt | ContinuedChat
Params = SamplingParams | dict | None


@dataclass(frozen=True, slots=True)
class Logprob:
    """A token, as its id and its bytes (part of a UTF-8 character, for some), and its log-probability."""

    token_id: int
    token: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class OutputLogprobs:
    """An output token's log-probability and the most likely tokens at its position, most likely first."""

    chosen: Logprob
    top: tuple[Logprob, ...] = ()


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    tool_results: list[ToolResult] = field(default_factory=list)  # a tool round's results, when it resumes
    timeline: list[Span] | None = None  # decode / tool / wait spans, on the last output
    num_cached_tokens: int = 0  # tokens whose KV came from the prefix cache
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: list[OutputLogprobs] | None = None  # of new_token_ids that are text, when the params ask
    # on the last output, where the model ended the request's last turn with a stop token: every
    # token of the request (prompt, generated, appended), for a follow-up's exact continuation
    final_token_ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counts for monitoring (the server's /metrics); `num_requests` is the server's own count."""

    num_blocks: int = 0
    num_used_blocks: int = 0
    num_awaiting_tools: int = 0
    num_requests: int = 0
    workers: WorkerStats = WorkerStats()
    num_session_blocks: int = 0  # of the used ones, kept for client tool follow-ups (core/sessions.py)


@runtime_checkable
class Engine(Protocol):
    """An engine: requests in, outputs per step. Not thread-safe: one thread drives it."""

    max_model_len: int

    def prepare(self, prompt: Prompt, **options: Any) -> PreparedPrompt:
        """Render and tokenize a prompt (and compile its tool grammar) on any thread."""

    def add_request(self, prompt: Prompt, params: Params = None, **options: Any) -> str:
        """Queue a request; ValueError, with nothing allocated, for unusable input."""

    def step(self) -> list[RequestOutput]:
        """Advance every request; the outputs of those that changed."""

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request in any state; None if it is unknown or already done."""

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...

    @property
    def has_unfinished(self) -> bool: ...

    def stream(self, prompt: Prompt, params: Params = None, **options: Any) -> Iterator[RequestOutput]: ...


class EngineBase:
    """The conveniences both engines share. A subclass keeps its live requests in
    `_requests` (by id) and implements `add_request`, `step`, `abort`, `get_request`, `close`."""

    def __init__(self) -> None:
        self._requests: dict[str, Any] = {}
        self._ids = itertools.count()

    def _new_id(self, request_id: str | None) -> str:
        """The caller's request id, or the next `req-N`; ValueError if it is in use."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def _check_length(self, num_tokens: int) -> None:
        """ValueError for a prompt with no room left for one output token."""
        limit = self.max_model_len  # type: ignore[attr-defined]  # set by each engine
        if num_tokens >= limit:
            raise ValueError(
                f"prompt has {num_tokens} tokens; the limit is {limit - 1} "
                f"(max_model_len {limit} leaves room for one output token)"
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, prompt: Prompt, params: Params = None, **options: Any) -> Iterator[RequestOutput]:
        """Add one request (``options`` as for ``add_request``) and step the engine until it
        finishes, yielding its outputs. Other requests' outputs are not returned: serve many with ``step``."""
        request_id = self.add_request(prompt, params, **options)
        try:
            while request_id in self._requests:
                yield from (out for out in self.step() if out.request_id == request_id)
        finally:
            self.abort(request_id)

    def generate(self, prompts: list[Prompt], params: Params = None) -> list[Any]:
        """Run prompts to completion together; returns the finished requests in prompt order."""
        requests = [self.get_request(self.add_request(p, params)) for p in prompts]
        while any(not r.finished for r in requests):
            self.step()
        return requests


def sampling_params(params: Params) -> SamplingParams:
    """SamplingParams from None (the defaults), SamplingParams or a dict of its fields."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    unknown = set(params) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    return SamplingParams(**params)


def render_prompt(tokenizer: Any, prompt: Any, tools: list[dict] | None) -> str | list:
    """A prompt as text (as given, or chat messages through the model's chat template with the
    tool list) or as the token ids given, for the engine to check; ValueError for anything else."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, list):
        return prompt
    raise ValueError(f"a prompt is text, chat messages or token ids, not {type(prompt).__name__}")


def continued_ids(tokenizer: Any, chat: ContinuedChat, tools: list[dict] | None) -> list[int] | None:
    """A `ContinuedChat`'s tokens: the reused ones, then the later messages rendered after them
    (`core.sessions.follow_up_text`); None where the chat template does not allow that (the
    caller renders everything)."""

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    try:
        stop_text = tokenizer.decode(chat.token_ids[-1:])
        text = follow_up_text(render, chat.messages, chat.num_reused, stop_text)
    except Exception:
        log.debug("exact continuation of %s fell back to rendering", chat.source_id, exc_info=True)
        return None
    return list(chat.token_ids) + tokenizer.encode(text, add_special_tokens=False)


def non_empty(prompt: str | list[int]) -> str | list[int]:
    if not prompt:
        raise ValueError("prompt is empty")
    return prompt
