"""RemoteEngine: Conveyor's tool layer in front of a remote OpenAI-compatible engine.

It implements the Engine protocol (`engine/api.py`), so the server, `chat`, `demo` and the
benchmarks drive it as they drive `LLMEngine`. Prompts are rendered here with the model's chat
template (`request.py`); each model turn is one streamed `/v1/completions` request (`turns.py`),
which the remote prefix cache matches as an extension of the text it has (re-rendered chat
turns matched the model's own output in 0 of 29 samples: shared/models.md). The text feeds the
same `ToolDriver` as the embedded engine's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from conveyor.backends.connection import open_backend
from conveyor.backends.constraints import TurnForm, caller_forms, remote_form
from conveyor.backends.request import RemoteOutput, RemoteRequest, prompt_text, refuse_unserved
from conveyor.backends.stream import RetryPolicy
from conveyor.backends.turns import RemoteTurns
from conveyor.config import EngineConfig
from conveyor.engine.api import (
    ContinuedChat,
    EngineBase,
    EngineStats,
    Params,
    PreparedPrompt,
    Prompt,
    sampling_params,
)
from conveyor.tools.driver import ToolDriver
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
        backend = config.backend
        self.config = config
        self.client, self.model_name, self.tokenizer = open_backend(config, progress, client)
        self.max_model_len = config.model.max_model_len
        super().__init__()
        # the remote forms constrain tagged calls only: fenced and bare JSON calls stay free
        form = lambda specs, choice, lenient=False: remote_form(backend.backend_dialect, specs, choice)
        self.driver = ToolDriver.start([*config.tools.tools, *tools], config.tools, self.tokenizer, form)
        retry = RetryPolicy(backend.max_retries, backend.retry_backoff_s)
        self.turns = RemoteTurns(
            self._requests,
            self.driver,
            self.client,
            self.model_name,
            self.tokenizer,
            self.max_model_len,
            retry,
        )

    def close(self) -> None:
        """Abort every request (closing its stream), stop the tool workers, drop the connections."""
        streams = [r.stream for r in self._requests.values() if r.stream is not None]
        for request_id in list(self._requests):
            self.abort(request_id)
        for stream in streams:
            stream.join(1.0)  # readers wake at once from the socket shutdown
        self.driver.close()
        self.client.close()

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> str:
        """The prompt text: text as is, chat messages through the chat template, token ids decoded."""
        return prompt_text(self.tokenizer, prompt, tools)

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
        json_schema: dict | None = None,
        session_id: str | None = None,
        tool_time_s: float | None = None,
    ) -> str:
        """As `LLMEngine.add_request`; ValueError before anything is sent. `constraint`: a dict of
        extra body fields (e.g. {"grammar": ...}) or a callable giving one per turn; default: the
        remote form of `tool_choice` (constraints.py). `session_id` and `tool_time_s` have no
        effect: the remote engine schedules by its own policy, and its KV is its own."""
        params = sampling_params(params)
        refuse_unserved(params, json_schema)
        options = self.driver.options(
            tools or [], tool_choice, tool_mode, call_format, max_tool_rounds, lenient_calls
        )
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.prepare(prompt, tools=tools, call_format=call_format)
        self._check_length(len(prompt.token_ids))
        request_id = self._new_id(request_id)
        factory = caller_forms(constraint)
        first = self.driver.constraint(options, 0, factory) or TurnForm()  # may raise: nothing registered yet
        request = RemoteRequest(request_id, prompt.text, params, len(prompt.token_ids))
        self.driver.attach(request_id, options, factory)
        self._requests[request_id] = request
        self.turns.open(request, first)
        return request_id

    def get_request(self, request_id: str) -> RemoteRequest:
        return self._requests[request_id]

    def abort(self, request_id: str) -> RemoteOutput | None:
        """End a request in any state, closing its remote stream at once; None if unknown."""
        request = self._requests.get(request_id)
        return None if request is None else self.turns.finish(request, "abort", cancel=True)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, self.driver.num_waiting, workers=WorkerStats.of(self.driver))

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RemoteOutput]:
        """Tool results in, then the remote events that arrived; the outputs of requests that changed."""
        return self.turns.step()
