"""The remote requests' turns: streamed text in, the tool driver's decisions, the next turn out.

`RemoteEngine` (remote.py) keeps the Engine protocol's surface: prompts, validation, ids,
stats. This object runs what happens between the remote engine and the tool layer once a
request is in: each turn is one streamed `/v1/completions` request (`RemoteStream`, whose
reader threads put events on `events`); its text feeds the `ToolDriver`; at a clean end the
driver says finish, wait for results or end with `tool_calls`; when results are in, the
rendered tool-result turn is appended and the next remote turn starts. A rejected field
closes the remote stream at once.
"""

from __future__ import annotations

import queue
from typing import Any

import httpx

from conveyor.backends.constraints import TurnForm
from conveyor.backends.request import RemoteOutput, RemoteRequest
from conveyor.backends.stream import (
    RemoteStream,
    RetryPolicy,
    StreamDone,
    StreamEvent,
    StreamFailed,
    StreamText,
)
from conveyor.tools.driver import Continuation, ToolDriver


class RemoteTurns:
    """The live remote requests (`requests`, shared with the engine) and their turns.
    Driven from the engine's thread only."""

    def __init__(
        self,
        requests: dict[str, RemoteRequest],
        driver: ToolDriver,
        client: httpx.Client,
        model_name: str,
        tokenizer: Any,
        max_model_len: int,
        retry: RetryPolicy,
    ) -> None:
        self.requests = requests
        self.driver = driver
        self.client = client
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.retry = retry
        self.events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()

    def open(self, request: RemoteRequest, form: TurnForm) -> None:
        """Send the conversation so far; the reply streams in on `self.events`."""
        key = (request.request_id, request.turn)
        body = request.body(self.model_name, form)
        request.stream = RemoteStream(self.client, "/v1/completions", body, key, self.events, self.retry)

    def step(self) -> list[RemoteOutput]:
        """Tool results in, then the remote events that arrived (waiting briefly for one when
        there are none); returns the outputs of requests that changed."""
        outputs = self._poll_tools(0.0)
        if not self.requests:
            return outputs
        if not outputs and all(r.stream is None for r in self.requests.values()):
            return self._poll_tools(0.02)  # every request waits on its tools: wait on the workers
        try:
            events = [self.events.get(timeout=0.0 if outputs else 0.02)]
        except queue.Empty:
            return outputs
        while len(events) < 256 and not self.events.empty():
            events.append(self.events.get_nowait())
        return outputs + [out for out in map(self._on_event, events) if out is not None]

    def finish(
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
        self.requests.pop(request.request_id, None)
        request.finish_reason, request.error = reason, error
        return request.output(text, results, self.driver.detach(request.request_id, cancel))

    def _on_event(self, event: StreamEvent) -> RemoteOutput | None:
        request = self.requests.get(event.key[0])
        if request is None or request.turn != event.key[1] or request.stream is None:
            return None  # a stream closed by abort or a rejection: its last events are dropped
        if isinstance(event, StreamText):
            return request.output(self._take(request, event.text))
        request.stream = None
        if isinstance(event, StreamFailed):
            return self.finish(request, "error", cancel=True, error=event.message)
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
            return self.finish(request, "length", cancel=True, text=text)
        if not self.driver.runs(request.request_id):
            return self.finish(request, "stop", cancel=False, text=text)
        # the stop token is not in the streamed text: the renderer's tail starts with it
        decision = self.driver.end_turn(request.request_id, None)
        if decision == "wait":
            return request.output(text)
        reason = "stop" if decision == "finish" else "tool_calls"
        return self.finish(request, reason, cancel=False, text=text)

    def _poll_tools(self, timeout_s: float) -> list[RemoteOutput]:
        """Tool results in: close the stream of a turn a rejected call cut off; continue requests
        whose results are all in with a new remote turn."""
        cut, ready = self.driver.poll(timeout_s)
        outputs = []
        for request_id in cut:
            request = self.requests[request_id]
            request.cut()
            outputs.append(request.output(""))
        return outputs + [self._continue(c) for c in ready]

    def _continue(self, ready: Continuation) -> RemoteOutput:
        """Append the tool-result turn to the conversation and start the next remote turn."""
        request = self.requests[ready.request_id]
        if ready.final is not None:  # the results are reported and the request ends
            return self.finish(request, ready.final, cancel=False, results=ready.results)
        request.prompt += ready.text
        request.turn += 1
        num_tokens = len(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        if num_tokens >= self.max_model_len or request.num_output_tokens >= request.params.max_tokens:
            return self.finish(request, "length", cancel=False, results=ready.results)
        self.open(request, self.driver.next_constraint(request.request_id) or TurnForm())
        return request.output("", ready.results)
