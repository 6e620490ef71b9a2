"""A tiny MCP server over stdio for the tests: `python tests/server/mcp_server.py`.

`--crash-at-start` exits at once with an error (a source that fails at start); `--mortal`
adds a tool `die` whose call kills the server (a source that dies later)."""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("conveyor-test")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool(annotations=ToolAnnotations(idempotent_hint=True))
def put(key: str, value: str) -> str:
    """Store a value (idempotent)."""
    return f"stored {key}"


@server.tool()
def send(to: str) -> str:
    """Send a message (no hints: external)."""
    return f"sent to {to}"


def die() -> str:
    """End this server's process at once."""
    os._exit(1)


if __name__ == "__main__":
    if "--crash-at-start" in sys.argv:
        sys.exit("mcp_server.py: crashing at start as asked")
    if "--mortal" in sys.argv:
        server.tool()(die)
    server.run("stdio")
