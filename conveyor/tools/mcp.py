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
        _connection(self.command)

    def finish(self, args: dict[str, Any]) -> Any:
        result = _connection(self.command).call(self.name, args)
        text = "\n".join(getattr(c, "text", "") or "" for c in result.content)
        if getattr(result, "is_error", False):
            raise RuntimeError(text or f"{self.name} failed")
        return text


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
                ready.set_exception(RuntimeError(f"MCP server {self.params.command!r} failed: {e}"))
            raise

    def run(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call(self, name: str, args: dict[str, Any]) -> Any:
        return self.run(self.session.call_tool(name, args))

    def close(self) -> None:
        """Stop the session (and the server process) and the loop thread."""
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(BaseException):  # it failed to start, or stopping failed: nothing to keep
            self._served.result(10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)


_connections: dict[str, _Connection] = {}  # per process (each tool worker has its own)
_lock = threading.Lock()


def _connection(command: str) -> _Connection:
    with _lock:
        if command not in _connections:
            _connections[command] = _Connection(command)
        return _connections[command]
