"""Where an engine comes from. `open_engine` is the one place that picks the embedded engine
(`conveyor.engine.LLMEngine`) or, when `config.backend.backend` names a URL, `RemoteEngine`:
Conveyor's tool layer in front of a remote OpenAI-compatible engine (vLLM, SGLang, llama.cpp
server). Both implement the Engine protocol (`engine/api.py`); servers, benchmarks and
commands create engines through this function and type against that protocol."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from conveyor.backends.connection import BackendError
from conveyor.config import EngineConfig

if TYPE_CHECKING:
    from conveyor.engine.api import Engine

__all__ = ["BackendError", "open_engine"]


def open_engine(
    config: EngineConfig = EngineConfig(), *, progress: bool = True, tools: Iterable[Any] = ()
) -> Engine:
    """An engine for `config`: the remote backend if `config.backend.backend` is set, else the embedded one."""
    if config.backend.backend:
        from conveyor.backends.remote import RemoteEngine

        return RemoteEngine(config, progress=progress, tools=tools)
    from conveyor.engine.engine import LLMEngine

    return LLMEngine(config, progress=progress, tools=tools)
