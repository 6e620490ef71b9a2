"""RemoteEngine: Conveyor's tool layer in front of a remote OpenAI-compatible engine.

It has the public interface of the embedded `LLMEngine` (add_request, step, abort,
has_unfinished, stream, generate, stats, close), so the server, `chat`, `demo` and the
benchmarks drive it unchanged. Each model turn is one streamed `/v1/completions` request
whose prompt is the conversation rendered locally with the model's chat template: the first
prompt, then each turn's raw output exactly as streamed, then the tool-result turn
(`ToolTurnRenderer`, as in the embedded engine). The remote engine thus sees every
continuation as an extension of the text it already has, and its prefix cache matches it;
`/v1/chat/completions` would re-render the assistant's calls through the template, which
matched the model's own output in 0 of 29 samples (see shared/models.md). The text deltas
feed the same parsers, executor and workers as the embedded engine (`rounds.py`).
"""
from __future__ import annotations

import itertools
import os
import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from conveyor.backends import BackendError
from conveyor.backends.constraints import TurnForm
from conveyor.backends.rounds import RemoteRequest, RemoteRounds
from conveyor.backends.stream import (
    Delta,
    Done,
    Event,
    Failed,
    RemoteStream,
    RetryPolicy,
)
from conveyor.config import EngineConfig
from conveyor.engine.engine import EngineStats, Prompt, RequestOutput, _sampling_params
from conveyor.engine.request import SamplingParams
from conveyor.engine.tool_loop import ToolLoop
from conveyor.engine.tool_rounds import BODY_FORMATS, ToolRounds
from conveyor.tools.workers import WorkerStats


@dataclass(slots=True)
class RemoteOutput(RequestOutput):
    """A RequestOutput with the remote engine's error message when finish_reason is "error"
    and the prompt tokens it computed over all turns (the rest came from its prefix cache).
    `new_token_ids` stays empty: the remote stream carries text."""

    error: str | None = None
    num_prefill_tokens: int = 0


class RemoteEngine(RemoteRounds):
    """See the module docstring. Not thread-safe: drive it from one thread (its stream readers
    are threads of their own that only put events on a queue)."""

    def __init__(self, config: EngineConfig = EngineConfig(), *, progress: bool = True,
                 tools: Iterable[Any] = (), client: httpx.Client | None = None) -> None:
        """`config.backend.backend` is the remote engine's base URL; `config.model.model` names the
        same model locally, for its tokenizer and chat template (prompts are rendered here)."""
        from transformers import AutoTokenizer

        from conveyor.engine.model.loader import resolve_model

        backend = config.backend
        if not backend.backend:
            raise ValueError("RemoteEngine needs config.backend.backend (the remote engine's URL)")
        self.config = config
        self.url = backend.backend.rstrip("/")
        self.client = client or _client(config)
        try:
            self.model_name = backend.backend_model or self._discover_model()
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.model, progress=progress))
        except BaseException:
            self.client.close()         # nothing is left open by a failed start
            raise
        self.max_model_len = config.model.max_model_len
        self.retry = RetryPolicy(backend.max_retries, backend.retry_backoff_s)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._requests: dict[str, RemoteRequest] = {}
        self._ids = itertools.count()
        self.tool_loop: ToolLoop | None = None
        specs = [*config.tools.tools, *tools]
        if specs:
            from conveyor.engine.tool_setup import start_tool_loop

            self.tool_loop = start_tool_loop(specs, config.tools, self.tokenizer)

    def _discover_model(self) -> str:
        """The first model the remote engine lists; also the readiness check at start-up."""
        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise BackendError(f"remote engine {self.url} is unreachable: {e}") from None
        if response.status_code != 200:
            raise BackendError(f"remote engine {self.url} answered {response.status_code} to /v1/models: "
                               f"{response.text[:300]}")
        models = response.json().get("data") or []
        if not models:
            raise BackendError(f"remote engine {self.url} lists no models; pass --backend-model")
        return models[0]["id"]

    def close(self) -> None:
        """Abort every request (closing its stream), stop the tool workers, drop the connections."""
        streams = [r.stream for r in self._requests.values() if r.stream is not None]
        for request_id in list(self._requests):
            self.abort(request_id)
        for stream in streams:
            stream.join(1.0)        # readers wake at once from the socket shutdown
        if self.tool_loop is not None:
            self.tool_loop.executor.pool.close()
        self.client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> str:
        """The prompt text: text as is, chat messages through the chat template, token ids decoded."""
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=False)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text = self.tokenizer.decode(prompt)
        else:
            raise ValueError(f"a prompt is text, chat messages or token ids, not {type(prompt).__name__}")
        if not text:
            raise ValueError("prompt is empty")
        return text

    def add_request(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
                    request_id: str | None = None, tools: list[str | dict] | None = None,
                    tool_choice: str | dict = "auto", tool_mode: str | None = None, call_format: str | None = None,
                    max_tool_rounds: int | None = None, constraint: Any = None, lenient_calls: bool = True) -> str:
        """As `LLMEngine.add_request`; raises ValueError before anything is sent. `constraint`:
        a dict of extra body fields for the remote request (e.g. {"grammar": ...}), or a callable
        that returns one per turn number; default: the remote form of `tool_choice` (`rounds.py`)."""
        params = _sampling_params(params)
        options = ToolRounds._tool_options(self, tools or [], tool_choice, tool_mode, call_format, max_tool_rounds,
                                           lenient_calls)
        shown = [t for t in tools or [] if isinstance(t, dict) or call_format not in BODY_FORMATS]
        text = self.encode(prompt, ToolRounds._tool_specs(self, shown))
        num_tokens = len(self.tokenizer.encode(text, add_special_tokens=False))
        if num_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {num_tokens} tokens; the limit is {self.max_model_len - 1}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if constraint is not None and not (callable(constraint) or isinstance(constraint, dict)):
            raise ValueError("a remote constraint is a dict of request fields or a callable returning one")
        request = RemoteRequest(request_id, text, params, num_tokens, options=options, constraint=constraint)
        first = self._turn_constraint(request)      # may raise: nothing is registered yet
        if options is not None and options.tools:
            self.tool_loop.attach(request_id, options)
        self._requests[request_id] = request
        self._open_turn(request, first)
        return request_id

    def _open_turn(self, request: RemoteRequest, form: TurnForm | None = None) -> None:
        """Send the conversation so far; the reply streams in on `self.events`."""
        form = form or self._turn_constraint(request)
        body = {"model": self.model_name, "prompt": request.prompt + form.opening, "stream": True,
                "stream_options": {"include_usage": True}, **_sampling_fields(request), **form.fields}
        request.forced, request.closing = form.opening, form.closing
        request.stream = RemoteStream(self.client, "/v1/completions", body, (request.request_id, request.turn),
                                      self.events, self.retry)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request in any state, closing its remote stream at once; None if unknown."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, "abort", cancel=True)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, self.tool_loop.num_waiting if self.tool_loop else 0, WorkerStats.of(self.tool_loop))

    # ---- the loop -------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Tool results in, then the remote events that arrived (waiting briefly for one when
        there are none); returns the outputs of requests that changed."""
        outputs = self._poll_tools(0.0)
        if not self._requests:
            return outputs
        if not outputs and all(r.stream is None for r in self._requests.values()):
            return self._poll_tools(0.02)       # every request waits on its tools: wait on the workers
        try:
            events = [self.events.get(timeout=0.0 if outputs else 0.02)]
        except queue.Empty:
            return outputs
        while len(events) < 256:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        for event in events:
            output = self._on_event(event)
            if output is not None:
                outputs.append(output)
        return outputs

    def _on_event(self, event: Event) -> RequestOutput | None:
        request = self._requests.get(event.key[0])
        if request is None or request.turn != event.key[1] or request.stream is None:
            return None         # a stream closed by abort or a rejection: its last events are dropped
        if isinstance(event, Delta):
            return self._on_text(request, event.text)
        request.stream = None
        if isinstance(event, Failed):
            return self._finish(request, "error", cancel=True, error=event.message)
        assert isinstance(event, Done)
        return self._end_turn(request, event.finish_reason, event.usage)

    # ---- conveniences ---------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | dict | None = None,
               **options: Any) -> Iterator[RequestOutput]:
        """As `LLMEngine.stream`: one request's outputs until it finishes."""
        request_id = self.add_request(prompt, params, **options)
        try:
            while request_id in self._requests:
                yield from (out for out in self.step() if out.request_id == request_id)
        finally:
            self.abort(request_id)

    def generate(self, prompts: list[Prompt], params: SamplingParams | dict | None = None) -> list[RemoteRequest]:
        """Run prompts to completion together; returns the finished requests in prompt order."""
        requests = [self._requests[self.add_request(p, params)] for p in prompts]
        while any(not r.finished for r in requests):
            self.step()
        return requests


def _client(config: EngineConfig) -> httpx.Client:
    """One pooled HTTP client for all requests (keep-alive connections to the remote engine)."""
    backend = config.backend
    key = backend.backend_api_key or os.environ.get("CONVEYOR_BACKEND_API_KEY", "")
    timeout = httpx.Timeout(connect=backend.connect_timeout_s, read=backend.read_timeout_s,
                            write=backend.connect_timeout_s, pool=backend.connect_timeout_s)
    limits = httpx.Limits(max_connections=backend.max_connections, max_keepalive_connections=backend.max_connections)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=backend.backend.rstrip("/"), timeout=timeout, limits=limits, headers=headers)


def _sampling_fields(request: RemoteRequest) -> dict[str, Any]:
    """The request's sampling parameters as OpenAI fields (plus the vLLM / llama.cpp extensions
    top_k, ignore_eos and stop_token_ids, sent only when set)."""
    p = request.params
    body: dict[str, Any] = {"max_tokens": max(1, p.max_tokens - request.num_output_tokens),
                            "temperature": p.temperature, "top_p": p.top_p}
    extras = {"top_k": p.top_k or None, "seed": p.seed, "stop": list(p.stop) or None,
              "ignore_eos": p.ignore_eos or None, "stop_token_ids": list(p.stop_token_ids) or None}
    body.update({k: v for k, v in extras.items() if v is not None})
    return body
