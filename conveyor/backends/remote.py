"""RemoteEngine: Conveyor's tool layer in front of a remote OpenAI-compatible engine.

It implements the Engine protocol (`engine/api.py`), so the server, `chat`, `demo` and the
benchmarks drive it as they drive `LLMEngine`. Each model turn is one streamed
`/v1/completions` request whose prompt is the conversation rendered locally with the model's
chat template (`request.py`): the remote engine sees every continuation as an extension of
the text it already has, and its prefix cache matches it; `/v1/chat/completions` would
re-render the assistant's calls through the template, which matched the model's own output
in 0 of 29 samples (see shared/models.md). The text feeds the same `ToolDriver` as the
embedded engine's (parsers, executor, workers, the same safety rules: external tools run
only after a clean end); a rejected field closes the remote stream at once.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable
from typing import Any

import httpx

from conveyor.backends.connection import connect, discover_model
from conveyor.backends.constraints import TurnForm, caller_forms, remote_form
from conveyor.backends.request import RemoteOutput, RemoteRequest
from conveyor.backends.stream import (
    RemoteStream,
    RetryPolicy,
    StreamDone,
    StreamEvent,
    StreamFailed,
    StreamText,
)
from conveyor.config import EngineConfig
from conveyor.engine.api import (
    ContinuedChat,
    EngineBase,
    EngineStats,
    Params,
    PreparedPrompt,
    Prompt,
    non_empty,
    render_prompt,
    sampling_params,
)
from conveyor.tools.driver import Continuation, ToolDriver
from conveyor.tools.workers import WorkerStats


class RemoteEngine(EngineBase):
    """See the module docstring. Not thread-safe: drive it from one thread (its stream readers
    are threads of their own that only put events on a queue)."""

    _requests: dict[str, RemoteRequest]

    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        *,
        progress: bool = True,
        tools: Iterable[Any] = (),
        client: httpx.Client | None = None,
    ) -> None:
        """`config.backend.backend` is the remote engine's base URL; `config.model.model` names the
        same model locally, for its tokenizer and chat template (prompts are rendered here)."""
        from transformers import AutoTokenizer

        from conveyor.engine.model.loader import resolve_model

        backend = config.backend
        if not backend.backend:
            raise ValueError("RemoteEngine needs config.backend.backend (the remote engine's URL)")
        self.config = config
        self.url = backend.backend.rstrip("/")
        self.client = client or connect(backend)
        try:
            self.model_name = backend.backend_model or discover_model(self.client, self.url)
            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve_model(config.model.model, progress=progress)
            )
        except BaseException:
            self.client.close()  # nothing is left open by a failed start
            raise
        self.max_model_len = config.model.max_model_len
        self.retry = RetryPolicy(backend.max_retries, backend.retry_backoff_s)
        self.events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        super().__init__()
        form = lambda specs, choice: remote_form(backend.backend_dialect, specs, choice)
        self.driver = ToolDriver.start([*config.tools.tools, *tools], config.tools, self.tokenizer, form)

    def close(self) -> None:
        """Abort every request (closing its stream), stop the tool workers, drop the connections."""
        streams = [r.stream for r in self._requests.values() if r.stream is not None]
        for request_id in list(self._requests):
            self.abort(request_id)
        for stream in streams:
            stream.join(1.0)  # readers wake at once from the socket shutdown
        self.driver.close()
        self.client.close()

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> str:
        """The prompt text: text as is, chat messages through the chat template, token ids decoded."""
        if isinstance(prompt, PreparedPrompt):
            return non_empty(prompt.text)
        if isinstance(prompt, ContinuedChat):  # no tokens of ours to reuse: the remote engine renders it all
            prompt = prompt.messages
        rendered = render_prompt(self.tokenizer, prompt, tools)
        if isinstance(rendered, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in rendered):
                raise ValueError("a prompt is text, chat messages or token ids, not list")
            rendered = self.tokenizer.decode(rendered)
        return non_empty(rendered)

    def prepare(
        self,
        prompt: Prompt,
        *,
        tools: list[str | dict] | None = None,
        call_format: str | None = None,
        **_: Any,
    ) -> PreparedPrompt:
        """The prompt rendered and tokenized (to check its length) off the engine's thread; pass
        the result to `add_request` with the same options."""
        text = self.encode(prompt, self.driver.shown_specs(tools or [], call_format))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        given = prompt.messages if isinstance(prompt, ContinuedChat) else prompt
        return PreparedPrompt(given.prompt if isinstance(given, PreparedPrompt) else given, ids, text)

    def add_request(
        self,
        prompt: Prompt,
        params: Params = None,
        *,
        request_id: str | None = None,
        tools: list[str | dict] | None = None,
        tool_choice: str | dict = "auto",
        tool_mode: str | None = None,
        call_format: str | None = None,
        max_tool_rounds: int | None = None,
        constraint: Any = None,
        lenient_calls: bool = True,
        session_id: str | None = None,
        tool_time_s: float | None = None,
    ) -> str:
        """As `LLMEngine.add_request`; raises ValueError before anything is sent. `constraint`:
        a dict of extra body fields for the remote request (e.g. {"grammar": ...}), or a callable
        that returns one per turn number; default: the remote form of `tool_choice` (constraints.py).
        `session_id` orders nothing here: the remote engine schedules by its own policy; `tool_time_s`
        is accepted and has no effect: the remote engine's KV is its own."""
        del session_id
        params = sampling_params(params)
        options = self.driver.options(
            tools or [], tool_choice, tool_mode, call_format, max_tool_rounds, lenient_calls
        )
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.prepare(prompt, tools=tools, call_format=call_format)
        if len(prompt.token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt.token_ids)} tokens; the limit is {self.max_model_len - 1}"
            )
        request_id = self._new_id(request_id)
        factory = caller_forms(constraint)
        first = (
            self.driver.constraint(options, 0, factory) or TurnForm()
        )  # may raise: nothing is registered yet
        request = RemoteRequest(request_id, prompt.text, params, len(prompt.token_ids))
        self.driver.attach(request_id, options, factory)
        self._requests[request_id] = request
        self._open_turn(request, first)
        return request_id

    def _open_turn(self, request: RemoteRequest, form: TurnForm) -> None:
        """Send the conversation so far; the reply streams in on `self.events`."""
        request.stream = RemoteStream(
            self.client,
            "/v1/completions",
            request.body(self.model_name, form),
            (request.request_id, request.turn),
            self.events,
            self.retry,
        )

    def get_request(self, request_id: str) -> RemoteRequest:
        return self._requests[request_id]

    def abort(self, request_id: str) -> RemoteOutput | None:
        """End a request in any state, closing its remote stream at once; None if unknown."""
        request = self._requests.get(request_id)
        return None if request is None else self._finish(request, "abort", cancel=True)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, self.driver.num_waiting, workers=WorkerStats.of(self.driver))

    # ---- the loop -------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RemoteOutput]:
        """Tool results in, then the remote events that arrived (waiting briefly for one when
        there are none); returns the outputs of requests that changed."""
        outputs = self._poll_tools(0.0)
        if not self._requests:
            return outputs
        if not outputs and all(r.stream is None for r in self._requests.values()):
            return self._poll_tools(0.02)  # every request waits on its tools: wait on the workers
        try:
            events = [self.events.get(timeout=0.0 if outputs else 0.02)]
        except queue.Empty:
            return outputs
        while len(events) < 256 and not self.events.empty():
            events.append(self.events.get_nowait())
        return outputs + [out for out in map(self._on_event, events) if out is not None]

    def _on_event(self, event: StreamEvent) -> RemoteOutput | None:
        request = self._requests.get(event.key[0])
        if request is None or request.turn != event.key[1] or request.stream is None:
            return None  # a stream closed by abort or a rejection: its last events are dropped
        if isinstance(event, StreamText):
            return request.output(self._take(request, event.text))
        request.stream = None
        if isinstance(event, StreamFailed):
            return self._finish(request, "error", cancel=True, error=event.message)
        assert isinstance(event, StreamDone)
        return self._end_turn(request, event.finish_reason, event.usage)

    def _take(self, request: RemoteRequest, text: str) -> str:
        text = request.take(text)
        self.driver.feed(request.request_id, text)
        return text

    def _end_turn(self, request: RemoteRequest, finish_reason: str, usage: dict[str, Any]) -> RemoteOutput:
        """The remote engine finished the turn: wait for its calls, or finish the request."""
        text = (
            self._take(request, "") if request.forced else ""
        )  # a turn that streamed nothing after its start
        if request.closing and finish_reason == "stop":
            text += self._take(request, request.closing)
        request.end_turn(usage)
        if finish_reason == "length":
            return self._finish(request, "length", cancel=True, text=text)
        if not self.driver.runs(request.request_id):
            return self._finish(request, "stop", cancel=False, text=text)
        # the stop token is not in the streamed text: the renderer's tail starts with it
        decision = self.driver.end_turn(request.request_id, None)
        if decision == "wait":
            return request.output(text)
        return self._finish(
            request, "stop" if decision == "finish" else "tool_calls", cancel=False, text=text
        )

    def _poll_tools(self, timeout_s: float) -> list[RemoteOutput]:
        """Tool results in: close the stream of a turn a rejected call cut off; continue requests
        whose results are all in with a new remote turn."""
        cut, ready = self.driver.poll(timeout_s)
        outputs = []
        for request_id in cut:
            request = self._requests[request_id]
            request.cut()
            outputs.append(request.output(""))
        return outputs + [self._continue(c) for c in ready]

    def _continue(self, ready: Continuation) -> RemoteOutput:
        """Append the tool-result turn to the conversation and start the next remote turn."""
        request = self._requests[ready.request_id]
        if ready.final is not None:  # the results are reported and the request ends
            return self._finish(request, ready.final, cancel=False, results=ready.results)
        request.prompt += ready.text
        request.turn += 1
        num_tokens = len(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        if num_tokens >= self.max_model_len or request.num_output_tokens >= request.params.max_tokens:
            return self._finish(request, "length", cancel=False, results=ready.results)
        self._open_turn(request, self.driver.next_constraint(request.request_id) or TurnForm())
        return request.output("", ready.results)

    def _finish(
        self,
        request: RemoteRequest,
        reason: str,
        *,
        cancel: bool,
        text: str = "",
        results: list | None = None,
        error: str | None = None,
    ) -> RemoteOutput:
        """End the request: close its stream, drop its tool session (cancelling its calls if `cancel`)."""
        request.close_stream()
        self._requests.pop(request.request_id, None)
        request.finish_reason, request.error = reason, error
        return request.output(text, results, self.driver.detach(request.request_id, cancel))
