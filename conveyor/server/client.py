"""The one bridge between asyncio and the engine: `EngineClient`.

The engine is synchronous and not thread-safe, so one thread owns it: it steps while there
is work and otherwise blocks on a queue of commands (typed dataclasses). Outputs go back to
each request's asyncio queue through `loop.call_soon_threadsafe`. The server sees only
`generate`, `abort`, `stats` and `close`, never the engine's internals; any `Engine`
(`engine/api.py`: the embedded one and the remote one) fits.

No request can kill the engine thread: whatever admitting a request raises fails that
request alone (400 for bad input), and a failed step fails the requests it ran. The heavy
and input-dependent work of admission, rendering the chat template, tokenizing and
compiling the tool-call grammar (`engine.prepare`, where the engine has it), runs on
small thread pools under a time limit, never on the engine thread: requests with tools on
one, the others on another, so that schemas slow to compile (xgrammar took 6-16 s for one
`maxLength` here) hold up only requests with tools. A preparation past its time limit fails
its request; its thread runs on to the end (a compile cannot be interrupted). Should the thread still
die, `failed` says why, every waiting request gets an error at once, later ones are refused,
and the `on_failure` callbacks run (the server then fails /health and exits non-zero).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from conveyor.engine.api import Engine, EngineStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What the server asks of the engine for one request (arguments of `add_request`)."""

    request_id: str
    prompt: str | list[int] | list[dict[str, Any]]
    params: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # tools, tool_choice, ...


@dataclass(frozen=True, slots=True)
class _Add:
    request: GenerateRequest
    sink: Any  # callable(item) run on the event loop


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class EngineError:
    """The engine refused or failed a request: the message and the HTTP status it means."""

    message: str
    status: int = 400


IDLE_TICK_S = 0.25
NUM_PREPARE_THREADS = 2  # per pool
_ACCEPTED = object()  # the first item of an accepted request's queue


class EngineFailed(RuntimeError):
    """The engine failed while the request ran (its step raised, or its thread died)."""


class RequestRejected(ValueError):
    """Raised by `generate` when the engine refuses the request before allocating anything;
    `status` is 400 for bad input, 500 for an engine fault, 503 when the engine is gone."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _rejection(e: BaseException) -> EngineError:
    """The error a request gets for an exception its admission raised: ValueError is the
    engines' word for unusable input; the others are what templates and tokenizers raise on
    input they were not written for (TypeError, RecursionError, Jinja's TemplateError)."""
    if isinstance(e, ValueError):
        return EngineError(str(e))
    if isinstance(e, TypeError | RecursionError | LookupError) or type(e).__name__ == "TemplateError":
        return EngineError(f"the prompt could not be rendered: {type(e).__name__}: {e}")
    log.exception("admitting a request failed")
    return EngineError(f"engine error while admitting the request: {type(e).__name__}: {e}", 500)


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
    """Async client of an engine driven by its own thread (see the module docstring).

    `prepare_timeout_s` bounds a request's preparation (template, tokens, grammar)."""

    def __init__(self, engine: Engine, prepare_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.prepare_timeout_s = prepare_timeout_s
        self.failed: str | None = None  # why the engine thread died, once it has
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._sinks: dict[str, Any] = {}
        self._stats = EngineStats()
        self._lock = threading.Lock()  # orders `failed` against new commands
        self._on_failure: list[Callable[[str], None]] = []
        self._prepare = getattr(engine, "prepare", None)
        self._preparers = {
            tools: ThreadPoolExecutor(NUM_PREPARE_THREADS, thread_name_prefix=f"conveyor-prepare-{name}")
            for tools, name in ((True, "tools"), (False, "plain"))
        }
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerateRequest) -> OutputStream:
        """Submit a request; returns its output stream once the engine accepted it. Raises
        RequestRejected when it is refused (nothing was allocated). Close the stream
        (`aclose`) to abort the request if it has not finished."""
        return (await self.generate_all([request]))[0]

    async def generate_all(self, requests: list[GenerateRequest]) -> list[OutputStream]:
        """Submit several requests together (a response's choices), the ones that share a prompt
        object prepared once; their output streams once the engine accepted them all. If any is
        refused, the others are aborted and RequestRejected is raised: nothing is left behind."""
        prepared: dict[int, GenerateRequest] = {}
        for r in requests:
            if id(r.prompt) not in prepared:
                prepared[id(r.prompt)] = await self._prepared(r)
        ready = [dataclasses.replace(r, prompt=prepared[id(r.prompt)].prompt) for r in requests]
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in ready]
        with self._lock:
            if self.failed:
                raise RequestRejected(f"the engine failed: {self.failed}", 503)
            for r, outputs in zip(ready, queues):
                sink = functools.partial(loop.call_soon_threadsafe, outputs.put_nowait)
                self._commands.put(_Add(r, sink))
        firsts = [await outputs.get() for outputs in queues]
        streams = [
            OutputStream(self, r.request_id, q) for r, q, f in zip(ready, queues, firsts) if f is _ACCEPTED
        ]
        refused = next((f for f in firsts if isinstance(f, EngineError)), None)
        if refused is not None:
            for stream in streams:
                await stream.aclose()
            raise RequestRejected(refused.message, refused.status)
        return streams

    async def _prepared(self, request: GenerateRequest) -> GenerateRequest:
        """The request with its prompt prepared off the engine thread, within the time limit."""
        if self._prepare is None:
            return request
        r = request
        pool = self._preparers[bool(r.options.get("tools"))]
        work = asyncio.get_running_loop().run_in_executor(pool, lambda: self._prepare(r.prompt, **r.options))
        try:
            prompt = await asyncio.wait_for(work, self.prepare_timeout_s)
        except TimeoutError:
            raise RequestRejected(
                f"preparing the request (chat template, tokens, tool grammar) took longer "
                f"than {self.prepare_timeout_s:g} s; send smaller tool schemas or prompts"
            ) from None
        except Exception as e:  # noqa: BLE001 - any failure here is this request's alone
            error = _rejection(e)
            raise RequestRejected(error.message, error.status) from None
        return GenerateRequest(r.request_id, prompt, r.params, r.options)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """Block and tool counts as of the engine's last step."""
        return self._stats

    @property
    def num_requests(self) -> int:
        return len(self._sinks)

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.engine, "max_model_len", None)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the engine thread) if the engine thread dies; at once
        if it already has."""
        with self._lock:
            if self.failed is None:
                self._on_failure.append(callback)
                return
        callback(self.failed)

    def close(self) -> None:
        """Stop the engine thread and close the engine."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join()
        for pool in self._preparers.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            log.exception("the engine thread died")
            self._die(f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        while True:
            idle = not self.engine.has_unfinished
            try:  # idle: wake now and then, so the engine can reap tool workers of aborted calls
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
        except Exception as e:  # noqa: BLE001 - a request the engine cannot take fails alone
            command.sink(_rejection(e))
            return
        self._sinks[r.request_id] = command.sink
        command.sink(_ACCEPTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("an engine step failed")
            for sink in self._sinks.values():
                sink(EngineError(f"engine error: {type(e).__name__}: {e}", 500))
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

    def _die(self, reason: str) -> None:
        """The engine thread is ending on an exception: no request may wait forever."""
        error = EngineError(f"the engine failed: {reason}", 503)
        with self._lock:
            self.failed = reason
            callbacks, self._on_failure = self._on_failure, []
            sinks, self._sinks = list(self._sinks.values()), {}
            while not self._commands.empty():
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    sinks.append(command.sink)
        for sink in sinks:
            sink(error)
        for callback in callbacks:
            callback(reason)


def _engine_stats(engine: Engine, num_requests: int) -> EngineStats:
    stats = getattr(engine, "stats", None)  # a test's stand-in engine may have none
    return (
        dataclasses.replace(stats(), num_requests=num_requests)
        if stats
        else EngineStats(num_requests=num_requests)
    )
