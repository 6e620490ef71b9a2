"""A tiny MCP server over stdio for the tests: `python tests/server/mcp_server.py`."""

from __future__ import annotations

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


if __name__ == "__main__":
    server.run("stdio")
