"""The server's tool sources (`--mcp` servers, `--tools` specs) at start and while serving.

At start every source must load: one that fails stops `conveyor serve` with its error
(`ToolSourceFailed`), unless `--allow-missing-tools` is given; then the server starts without
it, logs it and lists it in /health under `tools.missing`. While serving, an MCP server that
stops answering (its process died) turns its tools' results into errors that say so
(`mcp.SOURCE_UNAVAILABLE`); `ToolSources.observe` sees those results and /health lists the
source under `tools.failing` until one of its calls succeeds again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class ToolSourceFailed(RuntimeError):
    """A tool source did not start (and missing tools are not allowed)."""


@dataclass(slots=True)
class ToolSources:
    """Tool sources as /health reports them (see the module docstring)."""

    missing: dict[str, str] = field(default_factory=dict)  # source -> why it did not start
    owners: dict[str, str] = field(default_factory=dict)  # MCP tool name -> its source
    failing: dict[str, str] = field(default_factory=dict)  # source -> its last call's error

    def observe(self, results: Iterable[Any]) -> None:
        """A tool round's results (`ToolResult`s): mark their MCP sources failing or well."""
        from conveyor.tools.mcp import SOURCE_UNAVAILABLE

        for result in results:
            source = self.owners.get(result.name)
            if source is None:
                continue
            if result.is_error and SOURCE_UNAVAILABLE in result.content:
                if source not in self.failing:
                    log.error("tool source %s failed: %s", source, result.content)
                self.failing[source] = result.content
            elif self.failing.pop(source, None) is not None:
                log.warning("tool source %s answers again", source)

    def report(self) -> dict[str, Any] | None:
        """/health's `tools` entry; None when the server has no MCP source and none is missing."""
        if not (self.missing or self.owners):
            return None
        return {"missing": dict(self.missing), "failing": dict(self.failing)}


def load_sources(
    mcp: Iterable[str], specs: Iterable[str], allow_missing: bool
) -> tuple[list[Any], tuple[str, ...], ToolSources]:
    """Start the MCP servers (list their tools) and load the `--tools` specs. Returns the MCP
    tools, the specs that loaded and the sources' state; raises ToolSourceFailed for the first
    source that fails unless `allow_missing`."""
    from conveyor.tools.base import ToolRegistry
    from conveyor.tools.mcp import mcp_tools

    sources = ToolSources()
    tools: list[Any] = []
    for command in mcp:
        try:
            listed = mcp_tools(command)
        except Exception as e:  # noqa: BLE001 - whatever stopped it is the error to report
            _missing(sources, f"mcp: {command}", e, allow_missing)
            continue
        tools += listed
        sources.owners.update({t.name: f"mcp: {command}" for t in listed})
    kept = []
    for spec in specs:
        try:
            ToolRegistry([spec])
        except Exception as e:  # noqa: BLE001 - an import error, a bad object: report it
            _missing(sources, f"tools: {spec}", e, allow_missing)
            continue
        kept.append(spec)
    return tools, tuple(kept), sources


def _missing(sources: ToolSources, source: str, error: Exception, allow_missing: bool) -> None:
    reason = f"{type(error).__name__}: {error}"
    if not allow_missing:
        raise ToolSourceFailed(
            f"the tool source {source} failed to start ({reason}); fix it, or start with "
            "--allow-missing-tools to serve without it"
        ) from error
    log.error("serving without the tool source %s, which failed to start: %s", source, reason)
    sources.missing[source] = reason
