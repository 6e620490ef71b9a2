"""/v1/chat/completions: a validated request -> engine request -> chunks or one response.

Client tools (the request's `tools`) come back as `tool_calls` with finish_reason
"tool_calls". Server tools (registered at start, MCP included) are offered to every request
unless tool_choice is "none"; the engine runs them while the model decodes and continues the
same request with their results. A client sees server tool work only in shapes it already
understands or ignores: in a stream, a server call is a `server_tool_calls` entry of a chunk's
delta (streamed as `tool_calls` entries are: index, id and name first, then argument
fragments) and its result a `server_tool_results` entry (`index`, `tool_call_id`, `content`);
standard clients ignore both fields, and no delta has role "tool". A non-streamed response
lists them in `message.server_tool_calls` (each call with its `result`); `message.tool_calls`
holds only the calls the client must run.

Every call that ran is reported. A turn that calls client and server tools together: the
server calls run and are reported with their results, the client calls come back, and the
request ends with "tool_calls". Past `max_tool_rounds`, the last turn's calls already
running finish and are reported, the others do not run (their result says so), and the model
answers in one more turn that offers no tools; should it call one anyway, the request ends
with "length" (a limit cut the answer short, as max_tokens does) and the choice's
`finish_detail` names `max_tool_rounds`. Never "tool_calls" without a call for the client.
A server call whose request ended first (length, abort) is still listed, with `result` None.
A call of a tool nobody offered never runs and is never returned as a client call. JSON calls
count only inside `<tool_call>` tags unless the request sets `lenient_tool_calls` (then
```json fences and bare JSON lines too): prose that quotes a call is text.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from conveyor.server.calls import CallStream, StreamedCall, merge
from conveyor.server.client import EngineFailed, GenerateRequest, OutputStream
from conveyor.server.continuation import Continuations
from conveyor.server.protocol import MAX_SESSION_CHARS, ChatCompletionRequest, chat_messages


class BadRequest(ValueError):
    """A request the server refuses with 400 before anything reaches the engine; `param` names
    the parameter at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ChatRun:
    """One chat request in flight: its engine stream, call translation and timings."""

    id: str
    model: str
    calls: CallStream
    parallel: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    server_results: list[tuple[StreamedCall, str]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    finish_detail: str | None = None  # why a limit ended the request, where a tool round did
    on_results: Any = None  # called with each tool round's results (the server's tool-source health)
    content: list[str] = field(default_factory=list)  # the content deltas, as the client gets them
    session: Session | None = None


@dataclass(frozen=True, slots=True)
class Session:
    """What remembering the request's conversation for exact continuation needs."""

    continuations: Continuations
    messages: list[dict[str, Any]]
    tools: list[Any]


def build_chat(
    body: ChatCompletionRequest,
    request_id: str,
    model: str,
    server_tools: dict[str, dict],
    default_max_tokens: int,
    parser: str,
    continuations: Continuations | None = None,
    session_header: str | None = None,
) -> tuple[GenerateRequest, ChatRun]:
    """Check the request against the served tools and turn it into an engine request; with
    `continuations`, a follow-up of a conversation this server answered reuses its tokens.
    `session_header`: the X-Session-Id header's value, if any (see `session_id`)."""
    client = [t.model_dump() for t in body.tools or []]
    names = {t["function"]["name"] for t in client}
    choice: Any = body.tool_choice or "auto"
    schema = body.reply_schema
    offered_server = _offered_server(server_tools, names, choice, schema)
    if not isinstance(choice, str):
        wanted = choice.function.name
        if wanted not in names and wanted not in offered_server:
            raise BadRequest(f"tool_choice names an unknown tool {wanted!r}", "tool_choice")
        choice = choice.model_dump()
    messages = chat_messages(body.messages)
    params = body.engine_params(body.token_limit or default_max_tokens)
    tools = [*offered_server, *client]  # under "none" too: listed in the prompt, never called
    options: dict[str, Any] = (
        {"tools": tools, "tool_choice": choice, "lenient_calls": body.lenient_tool_calls} if tools else {}
    )
    if schema is not None:
        options["json_schema"] = schema
    session = session_id(session_header, body.user, body.metadata)
    if session:
        options["session_id"] = session
    if body.tool_time_s is not None:
        options["tool_time_s"] = body.tool_time_s
    calls = CallStream(
        request_id,
        set(offered_server),
        parse=bool(tools) and choice != "none",
        parser=parser,
        client_tools=names,
        lenient=body.lenient_tool_calls,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    run = ChatRun(request_id, model, calls, body.parallel_tool_calls, include_usage)
    prompt: Any = messages
    if continuations is not None:
        run.session = Session(continuations, messages, tools)
        prompt = continuations.prompt(messages, tools)
    return GenerateRequest(request_id, prompt, params, options), run


def _offered_server(server_tools: dict[str, dict], client: set[str], choice: Any, schema: Any) -> list[str]:
    """The server tools offered (none under tool_choice "none", nor with a JSON reply, which is
    one JSON value); a JSON reply with the client's tools is refused."""
    if schema is not None and client and choice != "none":
        raise BadRequest(
            "response_format with tools is not supported; send one or the other", "response_format"
        )
    if choice == "none" or schema is not None:
        return []
    return [n for n in server_tools if n not in client]


def session_id(header: str | None, user: str | None, metadata: dict[str, str] | None = None) -> str | None:
    """The program a request is a turn of, as the client names it: the X-Session-Id header, else
    `metadata.session_id`, else `user` (one end user's requests form one program); None leaves
    it to the engine (a hash of the conversation's opening)."""
    if header is not None and len(header) > MAX_SESSION_CHARS:
        raise BadRequest(f"X-Session-Id takes at most {MAX_SESSION_CHARS} characters", "X-Session-Id")
    return header or (metadata or {}).get("session_id") or user or None


async def drive(run: ChatRun, stream: OutputStream, metrics: Any) -> AsyncIterator[dict[str, Any]]:
    """The request's deltas (OpenAI delta dicts) as the engine produces them; sets
    `run.finish_reason` and `run.usage` at the end. Aborts the request when closed early."""
    try:
        async for out in stream:
            _timing(run, out, metrics)
            if out.finished and out.finish_reason == "error":
                raise EngineFailed(
                    f"the engine failed this request: {getattr(out, 'error', None) or 'unknown error'}"
                )
            if out.tool_results:
                for delta in _turn_results(run, out.tool_results):
                    yield delta
            for delta in merge(run.calls.feed(out.new_text)):
                run.content.append(delta.get("content", ""))
                yield delta
            if out.finished:
                for delta in merge(run.calls.end_turn()[0]):
                    run.content.append(delta.get("content", ""))
                    yield delta
                _finish(run, out, metrics)
                _remember(run, out)
                return
            if not run.parallel and any(c.ended for c in run.calls.client_calls):
                _finish(run, out, metrics, reason="tool_calls")  # one call asked for: stop here
                return
    finally:
        await stream.aclose()


def _turn_results(run: ChatRun, results: list[Any]) -> list[dict[str, Any]]:
    """A server tool round is over: the turn's last deltas, then one delta per result."""
    deltas, calls = run.calls.end_turn()
    out = merge(deltas)
    if run.on_results is not None:
        run.on_results(results)
    for call, result in zip(calls, results):
        run.server_results.append((call, result.content))
        entry = {"index": call.index, "tool_call_id": call.id, "content": result.content}
        out.append({"server_tool_results": [entry]})
    return out


def _timing(run: ChatRun, out: Any, metrics: Any) -> None:
    if not out.new_token_ids:
        return
    now = time.perf_counter()
    if not run.first_token_at:
        run.first_token_at = now
        metrics.ttft_s.observe(now - run.arrived)
    else:
        metrics.itl_s.observe(now - run.last_token_at)
    run.last_token_at = now


def _finish(run: ChatRun, out: Any, metrics: Any, reason: str | None = None) -> None:
    reason = reason or out.finish_reason
    if reason != "length" and run.calls.client_calls:  # "length": the last call may be cut short
        reason = "tool_calls"
    elif reason == "tool_calls":  # never "tool_calls" without a call for the client
        reason = "stop"
    if reason == "length" and out.tool_results:  # the last tool round's results ended it
        run.finish_detail = (
            "max_tool_rounds: no tool round was left and the model's answer turn called a tool "
            "again; the results are in server_tool_calls"
        )
    run.finish_reason = "stop" if reason == "abort" else reason
    run.usage = {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }
    if out.finished:
        metrics.observe_finished(out)


def _remember(run: ChatRun, out: Any) -> None:
    """Remember the conversation with the reply as returned, for an exact continuation."""
    if run.session is None or run.server_results or run.finish_reason not in ("stop", "tool_calls"):
        return
    reply = {
        "role": "assistant",
        "content": "".join(run.content) or None,
        "tool_calls": [c.as_tool_call() for c in run.calls.client_calls] or None,
    }
    run.session.continuations.remember(run.session.messages, run.session.tools, reply, out)


def chunk(
    run: ChatRun,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta` None gives the usage-only last chunk."""
    body: dict[str, Any] = {
        "id": run.id,
        "object": "chat.completion.chunk",
        "created": run.created,
        "model": run.model,
        "choices": [],
    }
    if delta is not None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None and run.finish_detail:
            choice["finish_detail"] = run.finish_detail
        body["choices"] = [choice]
    if run.include_usage:
        body["usage"] = usage
    return body


async def stream_chunks(run: ChatRun, stream: OutputStream, metrics: Any) -> AsyncIterator[dict[str, Any]]:
    yield chunk(run, {"role": "assistant", "content": ""})
    async for delta in drive(run, stream, metrics):
        yield chunk(run, delta)
    yield chunk(run, {}, run.finish_reason)
    if run.include_usage:
        yield chunk(run, None, usage=run.usage)


async def complete(run: ChatRun, stream: OutputStream, metrics: Any) -> dict[str, Any]:
    """The whole response of a non-streamed request."""
    content = []
    async for delta in drive(run, stream, metrics):
        content.append(delta.get("content", ""))
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content) or None,
        "tool_calls": [c.as_tool_call() for c in run.calls.client_calls] or None,
    }
    results = {c.index: r for c, r in run.server_results}
    server = [c for c in run.calls.calls if c.server]
    if server:  # every server call, with None where the request ended before its result
        message["server_tool_calls"] = [{**c.as_tool_call(), "result": results.get(c.index)} for c in server]
    return {
        "id": run.id,
        "object": "chat.completion",
        "created": run.created,
        "model": run.model,
        "choices": [_choice(run, message)],
        "usage": run.usage,
    }


def _choice(run: ChatRun, message: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": run.finish_reason}
    if run.finish_detail:
        choice["finish_detail"] = run.finish_detail
    return choice
