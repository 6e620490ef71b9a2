"""Where an engine comes from. `open_engine` is the one place that picks the embedded engine
(`conveyor.engine.LLMEngine`) or, when `config.backend.backend` names a URL, `RemoteEngine`:
Conveyor's tool layer in front of a remote OpenAI-compatible engine (vLLM, SGLang, llama.cpp
server), with the same public interface (add_request, step, abort, has_unfinished, stream,
close); servers, benchmarks and commands create engines through it."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from conveyor.config import EngineConfig


class BackendError(RuntimeError):
    """The remote engine cannot be used (unreachable, or it answered with an error at start-up)."""


def open_engine(config: EngineConfig = EngineConfig(), *, progress: bool = True, tools: Iterable[Any] = ()) -> Any:
    """An engine for `config`: the remote backend if `config.backend.backend` is set, else the embedded one."""
    if config.backend.backend:
        from conveyor.backends.remote import RemoteEngine

        return RemoteEngine(config, progress=progress, tools=tools)
    from conveyor.engine.engine import LLMEngine

    return LLMEngine(config, progress=progress, tools=tools)
