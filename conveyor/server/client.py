"""The one bridge between asyncio and the engine: `EngineClient`.

The engine is synchronous and not thread-safe, so one thread owns it: it steps while there
is work and otherwise blocks on a queue of commands (typed dataclasses). Outputs go back to
each request's asyncio queue through `loop.call_soon_threadsafe`. The server sees only
`generate`, `abort`, `stats` and `close`, never the engine's internals; any engine with the
public interface of `LLMEngine` (add_request, step, abort, has_unfinished, close) fits,
the embedded one today and a remote one later.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools.workers import WorkerStats


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What the server asks of the engine for one request (arguments of `add_request`)."""

    request_id: str
    prompt: str | list[int] | list[dict[str, Any]]
    params: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)   # tools, tool_choice, ...


@dataclass(frozen=True, slots=True)
class _Add:
    request: GenerateRequest
    sink: Any            # callable(item) run on the event loop


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class EngineError:
    """The engine refused a request (bad input): the message for a 400."""

    message: str


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_blocks: int = 0
    num_used_blocks: int = 0
    num_awaiting_tools: int = 0
    num_requests: int = 0
    workers: WorkerStats = WorkerStats()


IDLE_TICK_S = 0.25
_ACCEPTED = object()     # the first item of an accepted request's queue


class EngineFailed(RuntimeError):
    """The engine failed while the request ran (its step raised)."""


class RequestRejected(ValueError):
    """Raised by `generate` when the engine refuses the request before allocating anything."""


class OutputStream:
    """One request's engine outputs, until the finished one (async iterator)."""

    def __init__(self, client: EngineClient, request_id: str, outputs: asyncio.Queue[Any]) -> None:
        self.client = client
        self.request_id = request_id
        self.finished = False
        self._outputs = outputs

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, EngineError):
            self.finished = True
            raise EngineFailed(item.message)
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        """Abort the request unless it finished."""
        if not self.finished:
            self.finished = True
            self.client.abort(self.request_id)


class EngineClient:
    """Async client of an engine driven by its own thread (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._sinks: dict[str, Any] = {}
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerateRequest) -> OutputStream:
        """Submit a request; returns its output stream once the engine accepted it. Raises
        RequestRejected for bad input (nothing was allocated). Close the stream (`aclose`) to
        abort the request if it has not finished."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._commands.put(_Add(request, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)))
        first = await outputs.get()
        if isinstance(first, EngineError):
            raise RequestRejected(first.message)
        return OutputStream(self, request.request_id, outputs)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """Block and tool counts as of the engine's last step."""
        return self._stats

    @property
    def num_requests(self) -> int:
        return len(self._sinks)

    def close(self) -> None:
        """Stop the engine thread and close the engine."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join()
        self.engine.close()

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished
            try:    # idle: wake now and then, so the engine can reap tool workers of aborted calls
                command = self._commands.get(block=idle, timeout=IDLE_TICK_S if idle else None)
            except queue.Empty:
                command = None
                if idle:
                    self._step()
            while command is not None:
                if isinstance(command, _Stop):
                    self._abort_all()
                    return
                self._apply(command)
                command = self._commands.get_nowait() if not self._commands.empty() else None
            if self.engine.has_unfinished:
                self._step()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._sinks.pop(command.request_id, None)
            self.engine.abort(command.request_id)
            return
        r = command.request
        try:
            self.engine.add_request(r.prompt, r.params, request_id=r.request_id, **r.options)
        except ValueError as e:
            command.sink(EngineError(str(e)))
            return
        self._sinks[r.request_id] = command.sink
        command.sink(_ACCEPTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a broken step fails its requests, not the server
            for sink in self._sinks.values():
                sink(EngineError(f"engine error: {e}"))
            for request_id in list(self._sinks):
                self.engine.abort(request_id)
            self._sinks.clear()
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink(out)
                if out.finished:
                    del self._sinks[out.request_id]
        self._stats = _engine_stats(self.engine, len(self._sinks))

    def _abort_all(self) -> None:
        for request_id in list(self._sinks):
            self.engine.abort(request_id)
        self._sinks.clear()


def _engine_stats(engine: Any, num_requests: int) -> EngineStats:
    stats = getattr(engine, "stats", None)
    if stats is None:
        return EngineStats(num_requests=num_requests)
    s = stats()
    return EngineStats(s.num_blocks, s.num_used_blocks, s.num_awaiting_tools, num_requests,
                       getattr(s, "workers", WorkerStats()))
