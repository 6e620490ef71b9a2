"""The child side of the tool workers: typed pipe messages and the loop that serves calls.

Parent -> worker (pickled: the worker trusts its parent): Start, Field, LineMsg, Finish,
Cancel, Stop. Worker -> parent: the replies of `replies.py` (JSON: the parent trusts no
worker), Began and Idle telling the parent whether a worker is running a tool. A worker
serves one call in a process of its own (forked by the worker's zygote, or the worker itself
where it has no namespaces) and ignores messages for any call but its current one (they
belong to a call already over: rejected, failed or cancelled).

The sandbox it runs in is `sandbox.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from conveyor.tools import replies, sandbox, zygote
from conveyor.tools.base import CallInfo, FunctionTool, Tool, ToolRejected, ToolResult
from conveyor.tools.replies import BEGAN, IDLE, Began, Cancelled, Done, Failed, Idle, Ready, Reply  # noqa: F401 - the protocol's names
from conveyor.tools.sandbox import Policy, run_hook, set_cpu_budget

MAX_CONTENT_CHARS = 16 * 1024


# ---- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Start:
    call: CallInfo
    sent_at: float


@dataclass(frozen=True, slots=True)
class Field:
    call_id: str
    key: str
    value: Any
    sent_at: float


@dataclass(frozen=True, slots=True)
class LineMsg:
    call_id: str
    line: str
    sent_at: float


@dataclass(frozen=True, slots=True)
class Finish:
    call_id: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Cancel:
    call_id: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit after the current message."""


# ---- tools travel to workers by pickle ---------------------------------------------------------
def pickle_tools(tools: list[Tool]) -> bytes:
    """The tools as sent to each worker; RuntimeError naming a tool that cannot be pickled."""
    for t in tools:
        try:
            _dumps(t)
        except Exception as e:
            raise RuntimeError(
                f"tool {t.name!r} cannot be sent to a worker process ({type(e).__name__}: {e}); "
                "define it at module level and keep unpicklable state out of its "
                "attributes (create it in start())"
            ) from e
    return _dumps(tools)


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _ToolPickler(buffer).dump(obj)
    return buffer.getvalue()


class _ToolPickler(pickle.Pickler):
    """Pickles a function that `@tool` replaced in its module by a reference to that tool."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) and "<locals>" not in obj.__qualname__:
            owner: Any = sys.modules.get(obj.__module__)
            for part in obj.__qualname__.split("."):
                owner = getattr(owner, part, None)
            if isinstance(owner, FunctionTool) and owner.fn is obj:
                return tool_function, (obj.__module__, obj.__qualname__)
        return NotImplemented


def tool_function(module: str, qualname: str) -> Any:
    """The function of the `@tool` named `module.qualname` (how workers unpickle it)."""
    owner: Any = importlib.import_module(module)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return owner.fn


# ---- the call loop ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Active:
    """The call a worker is serving."""

    info: CallInfo
    cwd: str
    started_at: float
    tool: Tool | None = None
    error: str | None = None  # a hook failed: the result, at Finish
    delays: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)


def serve(conn: Connection, tools_blob: bytes, policy: Policy) -> None:
    """Worker process entry point: load the tools, sandbox, say Ready, then serve calls: in its
    own namespaces as a zygote (`zygote.py`: a fresh process per call), else itself, one call
    (the pool discards such a worker after it)."""
    try:
        tools = {t.name: t for t in pickle.loads(tools_blob)}  # imports their modules, before the sandbox
        report = sandbox.enter(policy, conn.fileno())
        if report.isolated and (why := zygote.confined(policy.outer_pid_ns)):
            raise zygote.Unconfined(f"the sandbox reports namespaces of its own, but {why}")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails start()
        _send(conn, Failed(_describe(e)))
        return
    _send(conn, Ready(report))

    def serve_call(call_conn: Connection) -> None:
        _Server(call_conn, tools, report.temp_root, policy.limits.cpu_time_s).run()

    if not report.isolated:
        serve_call(conn)
        return
    control = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    zygote.run(control, serve_call, report.temp_root, policy.outer_pid_ns)


class _Server:
    def __init__(self, conn: Connection, tools: dict[str, Tool], temp_root: str, cpu_time_s: int) -> None:
        self.conn, self.tools, self.temp_root, self.cpu_time_s = conn, tools, temp_root, cpu_time_s
        self.call: _Active | None = None
        self.free_since = 0.0  # when the last message was handled: later ones queued until then

    def run(self) -> None:
        # A reader thread keeps the pipe drained, so the parent never blocks on a busy worker.
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=_read_into, args=(self.conn, inbox), daemon=True).start()
        while not isinstance(msg := inbox.get(), Stop):
            _send(self.conn, BEGAN)
            self._handle(msg)
            self.free_since = time.perf_counter()
            if inbox.empty():
                _send(self.conn, IDLE)

    def _handle(self, msg: Any) -> None:
        current = self.call.info.call_id if self.call else None
        match msg:
            case Start():
                self._start(msg)
            case Cancel(call_id=call_id):
                if call_id == current:
                    self._end(cancel=True)
                _send(self.conn, Cancelled(call_id))
            case _ if msg.call_id != current:
                pass  # for a call already over
            case Field(key=key, value=value, sent_at=sent_at):
                self._hook(sent_at, "on_field", key, value)
            case LineMsg(line=line, sent_at=sent_at):
                self._hook(sent_at, "on_line", line)
            case Finish(args=args):
                self._finish(args)

    def _start(self, msg: Start) -> None:
        set_cpu_budget(self.cpu_time_s)
        cwd = tempfile.mkdtemp(prefix="call-", dir=self.temp_root)
        _enter(cwd)
        self.call = call = _Active(msg.call, cwd, time.perf_counter())
        tool = self.tools.get(msg.call.name)
        if tool is None:
            call.error = f"KeyError: no tool named {msg.call.name!r}"
            return
        try:
            call.tool = tool.for_call()
            run_hook(call.tool.start, msg.call)
        except BaseException as e:  # noqa: BLE001 - becomes the call's error result
            call.error = _describe(e)

    def _hook(self, sent_at: float, name: str, *args: Any) -> None:
        call = self.call
        assert call is not None
        now = time.perf_counter()
        call.delays.append(now - sent_at)
        call.queued.append(max(0.0, self.free_since - sent_at))
        if call.error is not None:
            return
        try:
            run_hook(getattr(call.tool, name), *args)
        except ToolRejected as e:
            self._reply(str(e), is_error=True, rejected=True)
            self._end(cancel=True)
        except BaseException as e:  # noqa: BLE001 - becomes the call's error result
            call.error = _describe(e)

    def _finish(self, args: dict[str, Any]) -> None:
        call = self.call
        assert call is not None and (call.tool is not None or call.error is not None)
        content, is_error = call.error, True
        if content is None:
            try:
                value = run_hook(call.tool.finish, args)
                content, is_error = (
                    (value if isinstance(value, str) else json.dumps(value, default=str)),
                    False,
                )
            except BaseException as e:  # noqa: BLE001 - becomes the call's error result
                content = _describe(e)
        self._reply(content, is_error=is_error)
        self._end(cancel=False)

    def _reply(self, content: str, *, is_error: bool, rejected: bool = False) -> None:
        call = self.call
        assert call is not None
        if len(content) > MAX_CONTENT_CHARS:
            content = (
                f"{content[:MAX_CONTENT_CHARS]}\n[truncated: the first {MAX_CONTENT_CHARS} "
                f"of {len(content)} characters]"
            )
        _send(
            self.conn,
            Done(
                ToolResult(
                    call.info.call_id,
                    call.info.name,
                    content,
                    is_error,
                    rejected,
                    call.started_at,
                    time.perf_counter(),
                    tuple(call.delays),
                    tuple(call.queued),
                ),
                sandbox.take_refusals(),
            ),
        )

    def _end(self, *, cancel: bool) -> None:
        call, self.call = self.call, None
        assert call is not None
        if cancel and call.tool is not None:
            with contextlib.suppress(BaseException):
                run_hook(call.tool.cancel)
        _enter(self.temp_root)
        shutil.rmtree(call.cwd, ignore_errors=True)


def _enter(directory: str) -> None:
    """Make `directory` the working directory and the home of temporary files."""
    os.chdir(directory)
    os.environ["TMPDIR"] = tempfile.tempdir = directory


def _send(conn: Connection, reply: Reply) -> None:
    conn.send_bytes(replies.encode(reply))


def _read_into(conn: Connection, inbox: queue.SimpleQueue[Any]) -> None:
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        inbox.put(Stop())  # the parent is gone


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
