"""Builds the engine's tool layer: registry, warm worker pool, executor and the tool loop."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from conveyor.config import ToolConfig
from conveyor.engine.tool_loop import ToolLoop, ToolTurnRenderer
from conveyor.tools.base import ToolRegistry
from conveyor.tools.executor import ToolExecutor


def start_tool_loop(tools: Iterable[Any], config: ToolConfig, tokenizer: Any) -> ToolLoop:
    """Register `tools` and start their workers (ready before the first request arrives)."""
    from conveyor.tools.workers import WorkerPool

    registry = ToolRegistry(tools)
    renderer = ToolTurnRenderer(tokenizer)    # fails early if the chat template cannot render tool turns
    pool = WorkerPool(registry, config)
    pool.start()
    return ToolLoop(ToolExecutor(registry, pool, config.tool_mode), renderer, config.max_tool_rounds)
