"""Errors in OpenAI's JSON shape: the exception the routes raise, the handlers that turn every
failure (bad input, an engine fault, anything unexpected) into JSON, never plain text, and
the request-body limit, answered the same way."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.server.client import EngineFailed
from conveyor.server.limits import InputRejected
from conveyor.server.protocol import error_body

log = logging.getLogger(__name__)
KIB = 1024


class ErrorResponse(JSONResponse):
    """An error's JSON, ASCII-escaped: a message that quotes bad input (a lone surrogate)
    cannot make the error response itself fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class BodyLimit:
    """ASGI middleware: a body past `max_bytes` gets 413 in OpenAI's error shape, refused by
    its Content-Length before it is read, or once the bytes that arrived pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = ErrorResponse(
                error_body(self._message(), "invalid_request_error", "body_too_large"), 413
            )
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes // KIB} KiB (--max-body-kb)"


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def install_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> ErrorResponse:
        return ErrorResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status)

    @app.exception_handler(EngineFailed)
    async def engine_failed(_: Request, e: EngineFailed) -> ErrorResponse:
        return ErrorResponse(error_body(str(e), "server_error", "engine_error"), status_code=500)

    @app.exception_handler(InputRejected)
    async def input_rejected(_: Request, e: InputRejected) -> ErrorResponse:
        return ErrorResponse(
            error_body(str(e), "invalid_request_error", None, e.param or None), status_code=400
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> ErrorResponse:  # OpenAI's shape, never plain text
        log.exception("unhandled error in a route")
        return ErrorResponse(
            error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> ErrorResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in e.errors()[:5])
        return ErrorResponse(
            error_body(message or "invalid request", "invalid_request_error", None, param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> ErrorResponse:
        return ErrorResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)
