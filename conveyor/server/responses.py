"""/v1/responses: a validated request -> engine request -> typed events or one response.

A Responses request is served as the chat request it amounts to (`chat.build_chat`: the
same tools, tool_choice checks and call translation): input items become chat messages
(`response_items.items_to_messages`), `instructions` a system message in front, function
tools chat tools. Client calls come back as `function_call` items; server tools (`--tools`,
MCP), offered to every request unless tool_choice is "none", run in the engine and come
back as `mcp_call` items with their output (`response_items.py`).

`previous_response_id` continues a stored response (`response_store.py`): the new input is
appended to that response's conversation, which is kept as chat messages: the previous
input (its instructions excluded, as OpenAI does) and the output turn by turn, exactly as
returned: a model turn's text and calls as one assistant message (the calls' ids and
argument strings as in the items), each server call's output as a tool message. These are
the messages a chat client would send back for the same conversation, so the engine's
exact continuation of conversations it produced (the sessions work, issue 18) matches a
`previous_response_id` follow-up the same way it matches a chat follow-up; nothing here
needs to change for it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from pydantic import ValidationError

from conveyor.server.chat import BadRequest, ChatRun, build_chat
from conveyor.server.client import EngineFailed, GenerateRequest, OutputStream
from conveyor.server.continuation import Continuations
from conveyor.server.errors import ApiError
from conveyor.server.protocol import ChatCompletionRequest
from conveyor.server.response_items import Event, OutputItems, items_to_messages
from conveyor.server.response_store import ResponseStore
from conveyor.server.responses_protocol import ResponsesRequest

log = logging.getLogger(__name__)
STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "abort": "cancelled"}


@dataclass(slots=True)
class ResponseRun:
    """One /v1/responses request in flight."""

    body: ResponsesRequest
    chat: ChatRun
    conversation: list[dict[str, Any]]  # the input as chat messages, instructions excluded
    output: OutputItems
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    num_events: int = 0

    @property
    def id(self) -> str:
        return self.chat.id

    def event(self, event: Event) -> Event:
        """The event with its `sequence_number`."""
        event["sequence_number"] = self.num_events
        self.num_events += 1
        return event

    def lifecycle(self, kind: str) -> Event:
        return self.event({"type": f"response.{kind}", "response": self.response()})

    def response(self) -> dict[str, Any]:
        """The response object as it stands."""
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.chat.model,
            "output": self.output.items,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": _dumped(body.tool_choice) or "auto",
            "tools": [_dumped(t) for t in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "metadata": body.metadata or {},
        }


def build_response(
    body: ResponsesRequest,
    request_id: str,
    model: str,
    server_tools: dict[str, dict],
    max_tokens: int,
    parser: str,
    store: ResponseStore,
    continuations: Continuations | None = None,
) -> tuple[GenerateRequest, ResponseRun]:
    """Check the request (400 naming the field; 404 for an unknown previous_response_id) and
    turn it into an engine request."""
    conversation = [*_history(body, store), *items_to_messages(body.items)]
    if not conversation:
        raise ApiError(400, "input is empty", param="input")
    chat_body = _chat_request(body, conversation, max_tokens)
    try:
        request, chat = build_chat(
            chat_body, request_id, model, server_tools, max_tokens, parser, continuations
        )
    except BadRequest as e:
        raise ApiError(
            400, str(e), param="text.format" if e.param == "response_format" else e.param
        ) from None
    return request, ResponseRun(body, chat, conversation, OutputItems(request_id))


def _history(body: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    if body.previous_response_id is None:
        return []
    stored = store.get(body.previous_response_id)
    if stored is None:
        raise ApiError(
            404,
            f"Previous response with id {body.previous_response_id!r} not found (unknown, deleted, "
            "expired, or created with store=false).",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return list(stored.messages)


def _chat_request(
    body: ResponsesRequest, conversation: list[dict[str, Any]], max_tokens: int
) -> ChatCompletionRequest:
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": [*system, *conversation],
        "max_completion_tokens": max_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
    }
    if body.tools:
        fields["tools"] = [t.chat_spec() for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = choice if isinstance(choice, str) else {"function": {"name": choice.name}}
    fields |= {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p)) if v is not None}
    if body.text is not None and body.text.format is not None:
        fields["response_format"] = body.text.format.response_format()
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = {"tool_choice": "tool_choice", "response_format": "text.format"}
        param = where.get(str(first["loc"][0]) if first["loc"] else "", "input")
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


def _dumped(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


async def _drive(run: ResponseRun, stream: OutputStream, metrics: Any) -> AsyncIterator[Event]:
    """The output events as the engine produces them (unnumbered); sets the status and usage at
    the end. Aborts the request when closed early."""
    calls, items = run.chat.calls, run.output
    out = None
    try:
        async for out in stream:
            _observe(run.chat, out, metrics)
            if out.finished and out.finish_reason == "error":
                raise EngineFailed(f"the engine failed this request: {out.error or 'unknown error'}")
            if out.tool_results:  # a server tool round ended: its turn first, then the results
                deltas, server_calls = calls.end_turn()
                for event in [*items.deltas(deltas), *items.results(zip(server_calls, out.tool_results))]:
                    yield event
            for event in items.deltas(calls.feed(out.new_text)):
                yield event
            if out.finished:
                for event in items.deltas(calls.end_turn()[0]):
                    yield event
                metrics.observe_finished(out)
            if out.finished or (not run.chat.parallel and any(c.ended for c in calls.client_calls)):
                _finish(run, out)  # finished, or the one call asked for is complete
                break
    finally:
        await stream.aclose()
    for event in items.close():
        yield event
    _remember(run, out)


def _remember(run: ResponseRun, out: Any) -> None:
    """Remember the conversation with the reply as a `previous_response_id` follow-up (or a
    client sending the items back) will carry it, for the engine's exact continuation."""
    session, replies = run.chat.session, run.output.messages()
    if session is None or out is None or not out.finished or len(replies) != 1 or run.chat.server_results:
        return
    if out.finish_reason not in ("stop", "tool_calls"):
        return
    session.continuations.remember(session.messages, session.tools, replies[0], out)


def _observe(chat: ChatRun, out: Any, metrics: Any) -> None:
    """Time to the first token and between tokens, as on the chat route."""
    if not out.new_token_ids:
        return
    now = time.perf_counter()
    if chat.first_token_at:
        metrics.itl_s.observe(now - chat.last_token_at)
    else:
        chat.first_token_at = now
        metrics.ttft_s.observe(now - chat.arrived)
    chat.last_token_at = now


def _finish(run: ResponseRun, out: Any) -> None:
    reason = out.finish_reason if out.finished else "tool_calls"
    run.status = STATUS.get(reason, "completed")
    run.usage = {
        "input_tokens": out.num_prompt_tokens,
        "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
        "output_tokens": out.num_output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
    }


def _keep(run: ResponseRun, store: ResponseStore) -> None:
    """Store the finished response unless the client said store=false."""
    if run.body.store is False:
        return
    if not store.put(run.id, run.response(), [*run.conversation, *run.output.messages()]):
        log.warning("response %s not stored: larger than --response-store-mb or the store is off", run.id)


async def complete(
    run: ResponseRun, stream: OutputStream, metrics: Any, store: ResponseStore
) -> dict[str, Any]:
    """The whole response of a non-streamed request."""
    async for _ in _drive(run, stream, metrics):
        pass
    _keep(run, store)
    return run.response()


async def stream_events(
    run: ResponseRun, stream: OutputStream, metrics: Any, store: ResponseStore
) -> AsyncIterator[Event]:
    """The typed events of a streamed request, each with its `sequence_number`; an engine
    failure ends the stream with `response.failed`."""
    yield run.lifecycle("created")
    yield run.lifecycle("in_progress")
    try:
        async for event in _drive(run, stream, metrics):
            yield run.event(event)
    except EngineFailed as e:
        run.status, run.error = "failed", {"code": "server_error", "message": str(e)}
        yield run.lifecycle("failed")
        return
    _keep(run, store)
    yield run.lifecycle("completed" if run.status == "completed" else "incomplete")


def sse_frame(event: Event) -> str:
    """One server-sent event, named by its type (the Responses API's framing)."""
    return f"event: {event.get('type', 'error')}\ndata: {json.dumps(event)}\n\n"


def watch(store: ResponseStore, registry: CollectorRegistry) -> None:
    """The store's size on /metrics: entries and bytes (expired ones dropped first)."""
    Gauge("conveyor_response_store_bytes", "Stored responses' JSON bytes", registry=registry).set_function(
        store.memory
    )
    Gauge("conveyor_response_store_entries", "Stored responses", registry=registry).set_function(
        lambda: len(store)
    )
