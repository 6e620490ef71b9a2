"""The FastAPI app: OpenAI routes, auth, OpenAI-shaped errors, health and metrics.

`create_app(load, config)`: `load()` builds the `EngineClient` (in a thread at start-up, so
the server answers 503 while the model loads); everything the routes need lives in `State`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.config import ServerConfig
from conveyor.server import chat
from conveyor.server.client import (
    EngineClient,
    EngineFailed,
    EngineStats,
    GenerateRequest,
    RequestRejected,
)
from conveyor.server.metrics import ServerMetrics
from conveyor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


@dataclass(slots=True)
class State:
    config: ServerConfig
    model: str
    server_tools: dict[str, dict] = field(default_factory=dict)   # name -> OpenAI spec
    parser: str = "hermes"
    client: EngineClient | None = None
    load_error: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    num_pending: int = 0
    ids: Any = field(default_factory=lambda: itertools.count())
    loaded: threading.Event = field(default_factory=threading.Event)   # set when loading ended (either way)

    def ready_client(self) -> EngineClient:
        if self.client is None:
            detail = f": {self.load_error}" if self.load_error else "; retry shortly"
            raise ApiError(503, f"the model is loading{detail}", "server_error", "model_not_ready")
        return self.client


def create_app(load: Callable[[], tuple[EngineClient, dict[str, dict], str]], config: ServerConfig,
               model: str) -> FastAPI:
    """`load()` returns (client, server tool specs by name, call parser kind)."""
    state = State(config, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load))
        yield
        await task
        if state.client is not None:
            await asyncio.to_thread(state.client.close)

    app = FastAPI(title="Conveyor", version="0.1", lifespan=lifespan)
    app.state.conveyor = state
    _errors(app)
    _routes(app, state)
    return app


async def _load(state: State, load: Callable[[], tuple[EngineClient, dict[str, dict], str]]) -> None:
    try:
        client, tools, parser = await asyncio.to_thread(load)
    except Exception as e:  # noqa: BLE001 - any load failure: the server keeps answering 503 with the cause
        state.load_error = f"{type(e).__name__}: {e}"
    else:
        state.server_tools, state.parser, state.client = tools, parser, client
    state.loaded.set()


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status)

    @app.exception_handler(EngineFailed)
    async def engine_failed(_: Request, e: EngineFailed) -> JSONResponse:
        return JSONResponse(error_body(str(e), "server_error", "engine_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in e.errors()[:5])
        return JSONResponse(error_body(message or "invalid request", "invalid_request_error", None, param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


def _auth(state: State) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        key = state.config.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                           "invalid_api_key")
    return check


def _routes(app: FastAPI, state: State) -> None:
    auth = [Depends(_auth(state))]

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.client is None:
            return JSONResponse({"status": "loading", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = state.client.stats() if state.client else EngineStats()
        body = state.metrics.render(stats, state.num_pending)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0,
                                            "owned_by": "conveyor"}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        client, request_id = _admit(state, body.model, "chatcmpl")
        try:
            request, run = chat.build_chat(body, request_id, state.model, state.server_tools,
                                           state.config.default_max_tokens, state.parser)
        except chat.BadRequest as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        stream = await _submit(state, client, request)
        if not body.stream:
            try:
                return await chat.complete(run, stream, state.metrics)
            finally:
                state.num_pending -= 1
        return _sse(state, chat.stream_chunks(run, stream, state.metrics))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest) -> Any:
        from conveyor.server.completions import complete_text, stream_text

        client, request_id = _admit(state, body.model, "cmpl")
        request = GenerateRequest(request_id, body.prompt, body.engine_params(body.max_tokens or 16))
        stream = await _submit(state, client, request)
        if not body.stream:
            try:
                return await complete_text(request_id, state.model, body, stream, state.metrics)
            finally:
                state.num_pending -= 1
        return _sse(state, stream_text(request_id, state.model, body, stream, state.metrics))


def _admit(state: State, model: str, prefix: str) -> tuple[EngineClient, str]:
    client = state.ready_client()
    if model != state.model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {state.model!r}",
                       code="model_not_found")
    if state.num_pending >= state.config.max_pending:
        raise ApiError(429, f"too many requests in flight (limit {state.config.max_pending}); retry later",
                       "rate_limit_error", "queue_full")
    return client, f"{prefix}-{next(state.ids)}-{int(time.time() * 1000) % 100000}"


async def _submit(state: State, client: EngineClient, request: GenerateRequest) -> Any:
    state.num_pending += 1
    try:
        return await client.generate(request)
    except RequestRejected as e:
        state.num_pending -= 1
        raise ApiError(400, str(e)) from None
    except BaseException:
        state.num_pending -= 1
        raise


def _sse(state: State, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield f"data: {json.dumps(item)}\n\n"
            yield "data: [DONE]\n\n"
        except RuntimeError as e:      # the engine failed mid-stream
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
        finally:
            await chunks.aclose()
            state.num_pending -= 1
    return StreamingResponse(events(), media_type="text/event-stream")
