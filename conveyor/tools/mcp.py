"""MCP tool servers over stdio (the official `mcp` package) as Conveyor tools.

`mcp_tools("command args")` starts the server once, lists its tools and returns one
`McpTool` per tool, with its side-effect class from the MCP annotations (`readOnlyHint` ->
"none", `idempotentHint` -> "idempotent", otherwise "external"). The tools run in the
engine's tool workers like any other: in a worker, `start` (the call's name was just decoded)
opens that worker's connection to the MCP server if it has none yet, so starting the server
overlaps the decoding of the arguments; `finish` sends `tools/call` over it. Each worker
keeps its connection (one MCP server process per worker) for later calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shlex
import threading
from typing import Any

from conveyor.tools.base import CallInfo, Tool

CONNECT_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = None  # a call is bounded by the tool worker's --call-timeout-s
SOURCE_UNAVAILABLE = "tool source unavailable"  # starts the error of a call whose MCP server is gone


def side_effects_of(annotations: Any) -> str:
    """Our side-effect class from MCP ToolAnnotations (None: nothing promised -> external)."""
    if annotations is not None and annotations.read_only_hint:
        return "none"
    if annotations is not None and annotations.idempotent_hint:
        return "idempotent"
    return "external"


class McpTool(Tool):
    """One tool of an MCP server (see the module docstring)."""

    def __init__(
        self, command: str, name: str, description: str, parameters: dict, side_effects: str
    ) -> None:
        self.command = command
        self.name = name
        self.description = description
        self.parameters = parameters or {"type": "object", "properties": {}}
        self.side_effects = side_effects

    def start(self, call: CallInfo) -> None:
        self._connected()

    def finish(self, args: dict[str, Any]) -> Any:
        connection = self._connected()
        try:
            result = connection.call(self.name, args, CALL_TIMEOUT_S)
        except Exception as e:  # the server went away mid-call: say so, reconnect next time
            _drop(self.command)
            raise RuntimeError(f"{SOURCE_UNAVAILABLE}: the MCP server {self.command!r} failed: {e!r}") from e
        text = "\n".join(getattr(c, "text", "") or "" for c in result.content)
        if getattr(result, "is_error", False):
            raise RuntimeError(text or f"{self.name} failed")
        return text

    def _connected(self) -> _Connection:
        try:
            return _connection(self.command)
        except Exception as e:  # it does not start (any more): a clear error result
            raise RuntimeError(
                f"{SOURCE_UNAVAILABLE}: the MCP server {self.command!r} does not start: {e}"
            ) from e


def mcp_tools(command: str) -> list[McpTool]:
    """Start the MCP server `command` (a shell-quoted command line), list its tools, stop it."""
    connection = _Connection(command)
    try:
        listed = connection.run(connection.session.list_tools())
    finally:
        connection.close()
    return [
        McpTool(command, t.name, t.description or "", t.input_schema, side_effects_of(t.annotations))
        for t in listed.tools
    ]


class _Connection:
    """A live MCP client session on its own event-loop thread (the caller stays synchronous)."""

    def __init__(self, command: str) -> None:
        from mcp import StdioServerParameters

        argv = shlex.split(command)
        if not argv:
            raise ValueError("an MCP server command is empty")
        self.params = StdioServerParameters(command=argv[0], args=argv[1:])
        self.loop = asyncio.new_event_loop()
        self.session: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="mcp-client", daemon=True)
        self._thread.start()
        self._stop: asyncio.Event | None = None
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(ready), self.loop)
        try:
            ready.result(CONNECT_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        from mcp import ClientSession
        from mcp.client.stdio import stdio_client

        self._stop = asyncio.Event()
        try:
            async with stdio_client(self.params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                self.session = session
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as e:
            if not ready.done():
                command = shlex.join([self.params.command, *self.params.args])
                ready.set_exception(RuntimeError(f"MCP server {command!r} failed: {_cause(e)}"))
            raise

    def run(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call(self, name: str, args: dict[str, Any], timeout_s: float | None = None) -> Any:
        if self._served.done():  # the session ended: the server process is gone
            raise ConnectionError("the MCP session has ended")
        return self.run(self.session.call_tool(name, args), timeout_s)

    def close(self) -> None:
        """Stop the session (and the server process) and the loop thread."""
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(BaseException):  # it failed to start, or stopping failed: nothing to keep
            self._served.result(10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)


def _cause(error: BaseException) -> str:
    """The first leaf of an exception group (anyio's task groups wrap the real error)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


_connections: dict[str, _Connection] = {}  # per process (each tool worker has its own)
_lock = threading.Lock()


def _connection(command: str) -> _Connection:
    with _lock:
        if command not in _connections:
            _connections[command] = _Connection(command)
        return _connections[command]


def _drop(command: str) -> None:
    """Forget a connection that failed (the next call starts the server again)."""
    with _lock:
        connection = _connections.pop(command, None)
    if connection is not None:
        connection.close()
