"""The FastAPI app: OpenAI routes, auth, OpenAI-shaped errors, health and metrics.

`create_app(load, config)`: `load()` builds the `EngineClient` (in a thread at start-up, so
the server answers 503 while the model loads); everything the routes need lives in `State`.
Bodies past `--max-body-kb` get 413, bad input 400 naming the parameter, and nothing a
request sends gives a 5xx unless the engine itself failed. A non-streamed request whose
client disconnects is aborted, as a stream is. If the engine thread dies, /health turns 503
and `on_fatal` runs (`serve` then stops uvicorn and exits non-zero).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from conveyor.config import ServerConfig
from conveyor.engine.api import EngineStats
from conveyor.server import chat, choices, responses
from conveyor.server.client import (
    EngineClient,
    EngineFailed,
    GenerateRequest,
    RequestRejected,
)
from conveyor.server.continuation import Continuations
from conveyor.server.errors import KIB, ApiError, BodyLimit, install_handlers
from conveyor.server.metrics import ServerMetrics
from conveyor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from conveyor.server.response_store import ResponseStore
from conveyor.server.responses_protocol import ResponsesRequest
from conveyor.server.tool_sources import ToolSources

log = logging.getLogger(__name__)


@dataclass(slots=True)
class State:
    config: ServerConfig
    model: str
    server_tools: dict[str, dict] = field(default_factory=dict)  # name -> OpenAI spec
    parser: str = "hermes"
    client: EngineClient | None = None
    load_error: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    num_pending: int = 0
    ids: Any = field(default_factory=lambda: itertools.count())
    loaded: threading.Event = field(default_factory=threading.Event)  # set when loading ended (either way)
    on_fatal: Callable[[], None] | None = None  # start-up failed or the engine thread died: stop serving
    tool_sources: ToolSources = field(default_factory=ToolSources)  # /health's view of MCP and --tools
    continuations: Continuations | None = None  # conversations answered, for exact continuation
    responses: ResponseStore = field(init=False)  # stored /v1/responses responses

    def __post_init__(self) -> None:
        c = self.config
        self.responses = ResponseStore(
            c.response_store_entries, c.response_store_mb << 20, c.response_store_ttl_s
        )
        responses.watch(self.responses, self.metrics.registry)

    def ready_client(self) -> EngineClient:
        if self.client is None:
            detail = f": {self.load_error}" if self.load_error else "; retry shortly"
            raise ApiError(503, f"the model is loading{detail}", "server_error", "model_not_ready")
        if self.client.failed:
            raise ApiError(
                503,
                f"the engine failed ({self.client.failed}); the server is shutting down",
                "server_error",
                "engine_failed",
            )
        return self.client


def create_app(
    load: Callable[[], tuple[Any, ...]],
    config: ServerConfig,
    model: str,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """`load()` returns (client, server tool specs by name, call parser kind) and optionally
    the `ToolSources` as a fourth item; `on_fatal()` runs on the event loop if loading fails or
    the engine thread dies."""
    state = State(config, model, on_fatal=on_fatal, continuations=Continuations(config, model))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load))
        yield
        await task
        if state.client is not None:
            await asyncio.to_thread(state.client.close)

    app = FastAPI(title="Conveyor", version="0.1", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_kb * KIB)
    app.state.conveyor = state
    install_handlers(app)
    _routes(app, state)
    return app


async def _load(state: State, load: Callable[[], tuple[Any, ...]]) -> None:
    try:
        client, tools, parser, *sources = await asyncio.to_thread(load)
    except Exception as e:  # noqa: BLE001 - any load failure: 503 with the cause, and `on_fatal`
        state.load_error = f"{type(e).__name__}: {e}"
        log.critical("start-up failed: %s", state.load_error)
        if state.on_fatal is not None:  # `serve` stops and exits non-zero with the error
            state.on_fatal()
    else:
        state.server_tools, state.parser, state.client = tools, parser, client
        state.tool_sources = sources[0] if sources else ToolSources()
        logging.getLogger("uvicorn.error").info("the engine is loaded: serving %s", state.model)
        loop = asyncio.get_running_loop()
        client.on_failure(lambda reason: loop.call_soon_threadsafe(_engine_died, state, reason))
    state.loaded.set()


def _engine_died(state: State, reason: str) -> None:
    log.critical("the engine thread died (%s): /health fails and the server stops", reason)
    if state.on_fatal is not None:
        state.on_fatal()


def _auth(state: State) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        key = state.config.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                "authentication_error",
                "invalid_api_key",
            )

    return check


def _routes(app: FastAPI, state: State) -> None:
    auth = [Depends(_auth(state))]
    _info_routes(app, state, auth)
    _chat_routes(app, state, auth)
    _completion_routes(app, state, auth)
    _responses_routes(app, state, auth)


def _info_routes(app: FastAPI, state: State, auth: list[Any]) -> None:
    """/health, /metrics and the model list."""

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.client is None:
            return JSONResponse({"status": "loading", "error": state.load_error}, status_code=503)
        if state.client.failed:
            return JSONResponse({"status": "failed", "error": state.client.failed}, status_code=503)
        tools = state.tool_sources.report()
        return JSONResponse({"status": "ok", **({"tools": tools} if tools else {})})

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = state.client.stats() if state.client else EngineStats()
        body = state.metrics.render(stats, state.num_pending)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != state.model:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist; this server serves {state.model!r}",
                code="model_not_found",
                param="model",
            )
        return _model_card(state)


def _chat_routes(app: FastAPI, state: State, auth: list[Any]) -> None:
    """`/v1/chat/completions`: one engine request per choice, streamed or not."""

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        client, request_id = _admit(state, body.model, "chatcmpl")
        choices.check_choices(state.config, body.n)
        max_tokens = _token_limit(client, body, state.config.default_max_tokens)
        requests, runs = _chat_choices(state, body, request_id, max_tokens, http.headers.get("x-session-id"))
        streams = await _submit_all(state, client, requests)
        if not body.stream:
            try:
                answer = choices.chat_response(runs, streams, state.metrics, body.logprobs)
                return await _unless_disconnected(http, answer)
            finally:
                state.num_pending -= 1
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(state, choices.chat_stream(runs, streams, state.metrics, body.logprobs, include_usage))


def _chat_choices(
    state: State, body: ChatCompletionRequest, request_id: str, max_tokens: int, session_header: str | None
) -> tuple[list[GenerateRequest], list[chat.ChatRun]]:
    """The engine request of each choice, and its run (each parses its own calls); 400 for a
    request the served tools cannot take."""
    try:
        built = [
            chat.build_chat(
                body,
                request_id,
                state.model,
                state.server_tools,
                max_tokens,
                state.parser,
                state.continuations,
                session_header,
            )
            for _ in range(body.n)
        ]
    except chat.BadRequest as e:
        raise ApiError(400, str(e), param=e.param) from None
    requests = [
        choices.choice_request(built[0][0], i, body.num_logprobs, choices.engine_id(request_id, i))
        for i in range(body.n)
    ]
    runs = [run for _, run in built]
    for run in runs:
        run.on_results = state.tool_sources.observe
    return requests, runs


def _completion_routes(app: FastAPI, state: State, auth: list[Any]) -> None:
    """`/v1/completions`: one engine request per prompt of the batch and per choice."""

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: Request) -> Any:
        from conveyor.server.completions import complete_text, stream_text

        client, request_id = _admit(state, body.model, "cmpl")
        choices.check_choices(state.config, body.n, len(body.prompts))
        try:
            session = chat.session_id(http.headers.get("x-session-id"), body.user)
        except chat.BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        params = body.engine_params(_token_limit(client, body, 16))
        options = {"session_id": session} if session else {}
        requests = [  # prompt j's choice i is choice j * n + i
            choices.choice_request(
                prompt, i, body.num_logprobs, choices.engine_id(request_id, j * body.n + i)
            )
            for j, prompt in enumerate(GenerateRequest(request_id, p, params, options) for p in body.prompts)
            for i in range(body.n)
        ]
        streams = await _submit_all(state, client, requests)
        if not body.stream:
            try:
                answer = complete_text(request_id, state.model, body, streams, state.metrics)
                return await _unless_disconnected(http, answer)
            finally:
                state.num_pending -= 1
        return _sse(state, stream_text(request_id, state.model, body, streams, state.metrics))


def _responses_routes(app: FastAPI, state: State, auth: list[Any]) -> None:
    """`/v1/responses`: create (streamed or not), and read or delete a stored response."""

    @app.post("/v1/responses", dependencies=auth)
    async def create_response(body: ResponsesRequest, http: Request) -> Any:
        client, request_id = _admit(state, body.model, "resp")
        max_tokens = _token_limit(client, body, state.config.default_max_tokens)
        request, run = responses.build_response(
            body,
            request_id,
            state.model,
            state.server_tools,
            max_tokens,
            state.parser,
            state.responses,
            state.continuations,
        )
        stream = await _submit(state, client, request)
        if not body.stream:
            try:
                return await _unless_disconnected(
                    http, responses.complete(run, stream, state.metrics, state.responses)
                )
            finally:
                state.num_pending -= 1
        events = responses.stream_events(run, stream, state.metrics, state.responses)
        return _sse(state, events, frame=responses.sse_frame, last="")

    @app.get("/v1/responses/{response_id}", dependencies=auth)
    async def get_response(response_id: str) -> dict[str, Any]:
        return _stored(state, response_id, state.responses.get).response

    @app.delete("/v1/responses/{response_id}", dependencies=auth)
    async def delete_response(response_id: str) -> dict[str, Any]:
        _stored(state, response_id, state.responses.pop)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


def _model_card(state: State) -> dict[str, Any]:
    return {"id": state.model, "object": "model", "created": 0, "owned_by": "conveyor"}


def _stored(state: State, response_id: str, take: Callable[[str], Any]) -> Any:
    stored = take(response_id)
    if stored is None:
        raise ApiError(
            404, f"No response found with id {response_id!r}.", code="not_found", param="response_id"
        )
    return stored


def _token_limit(client: EngineClient, body: ChatCompletionRequest | CompletionRequest, default: int) -> int:
    """The request's output token limit: at most the model's context (a larger one is a 400
    naming it); the default is cut to the context."""
    context = client.max_model_len
    limit = body.token_limit
    if limit is not None and context is not None and limit > context:
        raise ApiError(
            400,
            f"{body.limit_param} is {limit}, more than this model's context of {context} tokens "
            "(prompt included)",
            param=body.limit_param,
            code="context_length_exceeded",
        )
    return limit or (min(default, context) if context else default)


async def _unless_disconnected(http: Request, answer: Awaitable[Any]) -> Any:
    """The non-streamed answer, unless the client goes away first: then the answer is
    cancelled, which aborts its engine request (calls cancelled, blocks freed)."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return work.result()


async def _disconnected(http: Request) -> None:
    """Returns when the client disconnects (the body is already read: the next ASGI message
    is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _admit(state: State, model: str, prefix: str) -> tuple[EngineClient, str]:
    client = state.ready_client()
    if model != state.model:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model!r}",
            code="model_not_found",
        )
    if state.num_pending >= state.config.max_pending:
        raise ApiError(
            429,
            f"too many requests in flight (limit {state.config.max_pending}); retry later",
            "rate_limit_error",
            "queue_full",
        )
    return client, f"{prefix}-{next(state.ids)}-{int(time.time() * 1000) % 100000}"


async def _submit(state: State, client: EngineClient, request: GenerateRequest) -> Any:
    return (await _submit_all(state, client, [request]))[0]


async def _submit_all(state: State, client: EngineClient, requests: list[GenerateRequest]) -> list[Any]:
    """Submit one HTTP request's engine requests (its choices); one pending request for them all."""
    state.num_pending += 1
    try:
        return await client.generate_all(requests)
    except RequestRejected as e:
        state.num_pending -= 1
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        raise ApiError(e.status, str(e), kind) from None
    except BaseException:
        state.num_pending -= 1
        raise


def _data_frame(item: dict[str, Any]) -> str:
    return f"data: {json.dumps(item)}\n\n"


def _sse(
    state: State,
    chunks: AsyncIterator[dict[str, Any]],
    frame: Callable[[dict[str, Any]], str] = _data_frame,
    last: str = "data: [DONE]\n\n",
) -> StreamingResponse:
    """`chunks` as server-sent events, each framed by `frame`, then `last`."""

    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield frame(item)
            yield last
        except Exception as e:
            if not isinstance(e, EngineFailed):
                log.exception("a stream failed")
            message = str(e) if isinstance(e, EngineFailed) else f"internal error: {type(e).__name__}"
            yield frame(error_body(message, "server_error"))
        finally:
            await chunks.aclose()
            state.num_pending -= 1

    return StreamingResponse(events(), media_type="text/event-stream")
