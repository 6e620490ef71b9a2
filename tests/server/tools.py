"""Server tools for the server tests (loaded by module:object spec in the tool workers)."""

from __future__ import annotations

import time

from conveyor.tools.base import tool


@tool(side_effects="none")
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value-of-{key}"


@tool(side_effects="external")
def record(key: str) -> str:
    """Record a key (a side effect: runs only once its turn has ended cleanly)."""
    return f"recorded-{key}"


@tool(side_effects="none")
def slow(key: str) -> str:
    """Take a long time (a disconnect must cancel it)."""
    time.sleep(60)
    return key
