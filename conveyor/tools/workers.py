"""Tool worker processes, started before they are needed: the parent side.

`WorkerPool` binds each call to an idle worker (or queues it with its messages until one
frees), forwards the call's events, and collects results in `poll`. A worker serves one call
and is then discarded with every process it started (a fresh one, pre-started, takes its
place), so nothing a call's code changed reaches a later call. Workers run in the sandbox of
`sandbox.py`; tools that declare `network` get workers of their own that share the host's
network (the others have none). A tool that `requires_isolation` (the `python` tool) refuses
to start where the sandbox lacks a required layer, unless `config.unsafe_tools`. `poll` also
enforces the deadlines: the call's timeout (from `finish`, or from when a queued call gets its worker if
later) and the ~1 s a cancelled call's worker has to acknowledge. A worker past a deadline,
or dead, is killed with its process group and replaced at once; its call gets an error result
without waiting for the replacement. Workers come from the "forkserver" start method (fork is
unsafe in a parent with torch and OpenMP threads; spawn is slow); like spawn, each worker
imports the parent's main module, so scripts need the `if __name__ == "__main__":` guard.
The child side is `worker_main.py`, its sandbox `sandbox.py`, the processes themselves
`worker_procs.py`. Not thread-safe: one thread (the engine's) drives a pool.

Hand-off: where tools and decoding share CPU cores, a worker woken by a message queues
behind the forward pass's threads for a scheduler slice (2-5 ms measured here). So
`hand_off` (the engine calls it right after a step's updates; `poll` calls it too) waits,
up to `config.handoff_ms`, for each worker sent new work while it was caught up to take it
and go idle again (its `Began`, then `Idle`): the engine's thread sleeps, its core runs the
hook at once, a short hook ends within the wait, and the wait is paid only by steps that
sent work. Results that arrive during the wait are kept for the next `poll`. `num_running`
counts workers still running a tool's code after that; `num_computing`, those of them that
want a CPU (running on one or waiting for one), for the engine to leave them a core
(`ToolConfig.share_cores`).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing import util as mp_util
from multiprocessing.connection import wait
from typing import Any, Self

from conveyor.config import ToolConfig, cache_root
from conveyor.tools import replies, zygote
from conveyor.tools import worker_main as wm
from conveyor.tools import worker_procs as procs
from conveyor.tools.base import CallInfo, Tool, ToolRegistry, ToolResult
from conveyor.tools.sandbox import Limits, Policy, Report, default_view
from conveyor.tools.worker_procs import Worker

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # start(): all workers Ready within this
CANCEL_ACK_S = 1.0  # a cancelled call's worker acknowledges within this, or is replaced
COMPUTING_SHARE = 0.5  # a running worker wanting a CPU more than this share of the time is computing
MAX_FAILED_STARTS = 5  # replacements in a row that fail to start: the pool gives up
MAX_REPLIES = 64  # replies handled per worker per wait


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """The pool's counters, for /metrics: workers serving a call now, workers replaced after a
    crash, timeout or unacknowledged cancel, and tool-code actions the sandbox refused."""

    busy: int = 0
    restarts: int = 0
    refusals: int = 0

    @staticmethod
    def of(tool_loop: Any) -> WorkerStats:
        """The counters of an engine's tool loop (None: no tools; a stand-in pool counts nothing)."""
        pool = getattr(getattr(tool_loop, "executor", None), "pool", None)
        return pool.stats() if isinstance(pool, WorkerPool) else WorkerStats()


@dataclass(slots=True, eq=False)
class _Call:
    info: CallInfo
    pending: list[Any]  # messages held while the call waits for a worker
    worker: Worker | None = None
    finished: bool = False


class WorkerPool:
    """`config.num_workers` sandboxed worker processes serving the registry's tools.

    Messages for a call whose result was already reported (rejected, or its worker died)
    are dropped; a message for a call id never opened raises KeyError. No result is
    reported for a cancelled call.
    """

    def __init__(self, registry: ToolRegistry, config: ToolConfig) -> None:
        self.config = config
        self.num_restarts = 0  # workers replaced after a crash, timeout or unacknowledged cancel
        self.num_refusals = 0  # tool-code actions the workers' sandbox refused (its audit hook)
        self.report = Report()  # what the workers' sandbox provides (the last worker's report)
        self.handoff_s = 0.0  # time spent in hand-off waits (see the module docstring)
        self._early: list[ToolResult] = []  # results received by `hand_off`, for the next poll
        self._tools: list[Tool] = list(registry)
        self._by_name = {t.name: t for t in self._tools}
        self._profiles: dict[bool, tuple[bytes, Policy]] = {}  # network -> (its tools, its sandbox)
        self._failed_starts = 0
        self._started = False
        self._workers: list[Worker] = []
        self._calls: dict[str, _Call] = {}  # open calls, bound or queued
        self._queue: deque[str] = deque()
        self._dropped: set[str] = set()
        self._finalizer: weakref.finalize | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers and wait until each is Ready (RuntimeError with the cause if not)."""
        if self._finalizer is not None:
            raise RuntimeError("the worker pool was already started")
        self._profiles = self._make_profiles()
        # the tools' modules load once, in the forkserver: a worker (one per call) only forks
        modules = {type(t).__module__ for t in self._tools} | {
            getattr(t, "fn", len).__module__ for t in self._tools
        }
        procs.open_pool(sorted({"conveyor.tools.worker_main"} | modules - {"__main__", "builtins"}))
        self._recycler = procs.Recycler()
        self._finalizer = weakref.finalize(
            self, procs.shutdown, self._workers, self._recycler
        )  # also at exit
        try:
            self._workers.extend(
                self._spawn(network) for network in self._profiles for _ in range(self.config.num_workers)
            )
            deadline = time.perf_counter() + READY_TIMEOUT_S
            while not all(w.ready for w in self._workers):
                if time.perf_counter() >= deadline:
                    raise RuntimeError(f"tool workers did not start within {READY_TIMEOUT_S:g} s")
                self._receive(deadline - time.perf_counter(), [])
            self._check_isolation()
            self._started = True
        except BaseException:
            self.close()
            raise

    def _make_profiles(self) -> dict[bool, tuple[bytes, Policy]]:
        """The tools and sandbox of each kind of worker: without network, and with it if needed."""
        config = self.config
        limits = Limits(
            config.cpu_time_s, config.memory_mb, config.file_size_mb, config.worker_nice, config.max_processes
        )
        extra = [procs.package_root(type(t).__module__) for t in self._tools]
        extra += [path for t in self._tools for path in t.read_paths]
        hidden = [
            str(cache_root()),
            os.path.expanduser("~/.ssh"),
            mp_util.get_temp_dir(),
        ]  # + the forkserver's socket
        view = default_view(extra, hidden, config.memory_mb)
        profiles = {}
        for network in sorted({bool(t.network) for t in self._tools} or {False}):
            tools = [t for t in self._tools if bool(t.network) == network]
            profiles[network] = (
                wm.pickle_tools(tools),
                Policy(limits, view, config.sandbox_uid, network, zygote.outer_pid_namespaces()),
            )
        return profiles

    def _check_isolation(self) -> None:
        """Refuse tools that need the whole sandbox where a layer is missing (unless unsafe_tools)."""
        missing = self.report.missing_required()
        needy = [t.name for t in self._tools if t.requires_isolation]
        if missing and needy and not self.config.unsafe_tools:
            raise RuntimeError(
                f"tool {needy[0]!r} needs an isolated sandbox, and this machine cannot provide "
                f"it: missing {'; '.join(missing)}. Pass --unsafe-tools to run it anyway"
            )
        if self.report.missing:
            log.warning(
                "tool workers run without: %s", "; ".join(f"{k} ({v})" for k, v in self.report.missing)
            )

    def close(self) -> None:
        """Stop all workers (killing those that do not exit promptly). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._calls.clear()
        self._queue.clear()

    def __enter__(self) -> Self:
        if self._finalizer is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- a call's messages --------------------------------------------------------------------
    def open_call(self, call: CallInfo, sent_at: float) -> None:
        """Bind the call to an idle worker and start it there, or queue it."""
        if self._finalizer is None or not self._finalizer.alive:
            raise RuntimeError("the worker pool is not running (start() it first)")
        if call.call_id in self._calls or call.call_id in self._dropped:
            raise ValueError(f"call {call.call_id!r} is already open")
        self._calls[call.call_id] = _Call(call, [wm.Start(call, sent_at)])
        self._queue.append(call.call_id)
        self._dispatch()

    def send_field(self, call_id: str, key: str, value: Any, sent_at: float) -> None:
        self._forward(call_id, wm.Field(call_id, key, value, sent_at))

    def send_line(self, call_id: str, line: str, sent_at: float) -> None:
        self._forward(call_id, wm.LineMsg(call_id, line, sent_at))

    def finish(self, call_id: str, args: dict) -> None:
        """The call is complete; its timeout clock starts (once it has a worker)."""
        if call_id in self._dropped:
            self._dropped.discard(call_id)
            return
        self._forward(call_id, wm.Finish(call_id, args))
        call = self._calls[call_id]
        call.finished = True
        if call.worker is not None:
            call.worker.deadline = time.perf_counter() + self.config.call_timeout_s

    def cancel(self, call_id: str) -> None:
        """Drop the call; its worker runs the tool's `cancel` and is free again."""
        self._dropped.discard(call_id)
        call = self._calls.pop(call_id, None)
        if call is not None and call.worker is None:
            self._queue.remove(call_id)
        elif call is not None and call.worker is not None:
            procs.send(call.worker, wm.Cancel(call_id))
            call.worker.cancelling, call.worker.deadline = True, time.perf_counter() + CANCEL_ACK_S

    # ---- results ------------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> list[ToolResult]:
        """Finished results; with timeout_s > 0, block until one arrives or timeout_s passes."""
        results, self._early = self._early, []
        self._hand_off(results)
        stop_at = time.perf_counter() + timeout_s
        while True:
            wake_at = min([stop_at, *(w.deadline for w in self._workers)])
            self._receive(max(0.0, wake_at - time.perf_counter()), results)
            self._enforce_deadlines(results)
            self._dispatch()
            if results or time.perf_counter() >= stop_at:
                return results

    def hand_off(self) -> None:
        """Let workers just sent new work take it now (see the module docstring)."""
        self._hand_off(self._early)

    def stats(self) -> WorkerStats:
        return WorkerStats(self.num_busy, self.num_restarts, self.num_refusals)

    @property
    def num_busy(self) -> int:
        return sum(w.call_id is not None for w in self._workers)

    @property
    def num_idle(self) -> int:
        return sum(w.ready and not w.served for w in self._workers)

    @property
    def num_running(self) -> int:
        """Workers running a tool's code (a hook, or a call's finish) right now, as last heard."""
        return sum(w.running for w in self._workers)

    def num_computing(self) -> int:
        """Workers running a tool's code that wanted a core (on a CPU or in a run queue for one,
        `worker_procs.cpu_demand_seconds`) more than half of the time since the last call, at
        any load; one that began since counts if its tool is `cpu_bound`, until it has been
        measured."""
        now, count = time.perf_counter(), 0
        for worker in self._workers:
            if not worker.running:
                worker.cpu_mark = None
                continue
            demand_s, mark = procs.cpu_demand_seconds(worker), worker.cpu_mark
            if mark is None:
                call = self._calls.get(worker.call_id or "")
                count += call is None or getattr(self._by_name.get(call.info.name), "cpu_bound", True)
            else:
                count += demand_s - mark[1] > COMPUTING_SHARE * (now - mark[0])
            worker.cpu_mark = (now, demand_s)
        return count

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # ---- internals ----------------------------------------------------------------------------
    def _hand_off(self, results: list[ToolResult]) -> None:
        """Wait (up to `config.handoff_ms`) until workers just sent new work have taken it."""
        start = time.perf_counter()
        stop_at = start + self.config.handoff_ms / 1e3
        while waiting := [w for w in self._workers if w.handing_off and (w.num_unbegun or w.running)]:
            left = stop_at - time.perf_counter()
            if left <= 0:
                break
            self._receive(left, results, waiting)
        for worker in self._workers:
            worker.handing_off = False
        self.handoff_s += time.perf_counter() - start

    def _forward(self, call_id: str, msg: Any) -> None:
        if call_id in self._dropped:
            return
        call = self._calls[call_id]
        if call.worker is None:
            call.pending.append(msg)
        else:
            procs.send(call.worker, msg)

    def _dispatch(self) -> None:
        """Bind queued calls to idle workers of their tool's kind and send what each has so far."""
        idle = [w for w in self._workers if w.ready and not w.served]
        for call_id in list(self._queue):
            call = self._calls[call_id]
            worker = next((w for w in idle if w.network == self._network_of(call.info.name)), None)
            if worker is None:
                continue
            idle.remove(worker)
            self._queue.remove(call_id)
            call.worker, worker.call_id, worker.served = worker, call_id, True
            for msg in call.pending:
                procs.send(worker, msg)
            call.pending.clear()
            if call.finished:
                worker.deadline = time.perf_counter() + self.config.call_timeout_s

    def _receive(self, wait_s: float, results: list[ToolResult], workers: list[Worker] | None = None) -> None:
        """Wait up to wait_s for replies, zygotes' call processes or exits (of `workers`,
        default all), and handle them."""
        self._adopt()
        owners: dict[Any, tuple[Worker, bool] | None] = {self._recycler.wake_fd: None}  # None: a replacement
        for w in self._workers if workers is None else workers:
            owners[w.process.sentinel] = (w, False)
            if w.conn is not None:
                owners[w.conn] = (w, False)
            if w.control is not None:
                owners[w.control] = (w, True)  # True: from its zygote
        for ready in wait(list(owners), wait_s):
            if (entry := owners[ready]) is None:
                self._adopt()
                continue
            worker, from_zygote = entry
            if worker not in self._workers:
                continue  # replaced already (conn and sentinel both ready)
            broken = ""
            try:
                if from_zygote:
                    procs.take_call_process(worker)
                else:
                    self._take_replies(worker, results)
            except (EOFError, OSError):
                broken = "died"
            except ValueError:
                broken = "sent a malformed message"
            if worker in self._workers and (broken or not worker.process.is_alive()):  # not retired
                worker.process.join(0.1 if not broken else 0.0)  # its exit status, if it has one
                self._replace(
                    worker,
                    results,
                    f"RuntimeError: the tool's worker process {broken or 'died'} "
                    f"({procs.exit_text(worker.process)})",
                )

    def _take_replies(self, worker: Worker, results: list[ToolResult]) -> None:
        conn = worker.conn
        for _ in range(MAX_REPLIES):  # a flooding worker cannot hold the engine here
            if worker not in self._workers or worker.conn is not conn or conn is None or not conn.poll():
                return  # retired, reset, or turned into a zygote
            self._on_message(worker, replies.decode(conn.recv_bytes(replies.MAX_REPLY_BYTES)), results)

    def _on_message(self, worker: Worker, msg: Any, results: list[ToolResult]) -> None:
        match msg:
            case wm.Began():
                worker.num_unbegun -= 1
                worker.running = True
            case wm.Idle():
                worker.running = False
            case wm.Ready(report=report) if (
                not worker.ready and worker.control is None
            ):  # before any tool code
                worker.temp_root, self.report = report.temp_root, report
                self._failed_starts = 0
                if report.isolated:
                    procs.become_zygote(worker)  # ready once its first call process is there
                else:
                    worker.ready = True
            case wm.Failed(error=error) if not self._started:
                raise RuntimeError(f"a tool worker failed to start: {error}")
            case wm.Failed(error=error):  # a replacement: it exits, and is replaced (`_replace`)
                log.error("a tool worker failed to start: %s", error)
            case wm.Done(result=result, refusals=refusals) if (
                result.call_id == worker.call_id and not worker.cancelling
            ):
                call = self._calls.pop(result.call_id)
                if not call.finished:
                    self._dropped.add(result.call_id)  # rejected: later messages are dropped
                self.num_refusals += refusals
                results.append(result)
                self._retire(worker)
            case wm.Cancelled(call_id=call_id) if call_id == worker.call_id and worker.cancelling:
                self._retire(worker)

    def _enforce_deadlines(self, results: list[ToolResult]) -> None:
        now = time.perf_counter()
        for worker in [w for w in self._workers if w.deadline <= now]:
            self._replace(
                worker,
                results,
                f"TimeoutError: the call did not finish within "
                f"{self.config.call_timeout_s:g} s; its worker was stopped",
            )

    def _replace(self, worker: Worker, results: list[ToolResult], error: str) -> None:
        """Kill the worker, start its replacement, and give its call (if any) an error result."""
        if not worker.ready:
            self._failed_starts += 1
            if not self._started or self._failed_starts >= MAX_FAILED_STARTS:
                raise RuntimeError(
                    f"a tool worker exited before it was ready ({procs.exit_text(worker.process)})"
                )
        call = self._calls.pop(worker.call_id, None) if worker.call_id and not worker.cancelling else None
        if call is not None:
            if not call.finished:
                self._dropped.add(call.info.call_id)
            results.append(
                ToolResult(
                    call.info.call_id, call.info.name, error, is_error=True, done_at=time.perf_counter()
                )
            )
        self._workers.remove(worker)
        self._recycler.submit(worker, *self._profiles[worker.network])
        self.num_restarts += 1

    def _retire(self, worker: Worker) -> None:
        """The worker's call is over: its zygote resets it (killing every process of the call)
        and forks the next call process; a worker without one is discarded (with all its
        processes) for a fresh one, which the recycler thread starts (`_adopt` takes it in)."""
        procs.free(worker)
        if worker.control is not None:
            procs.next_call(worker)
            return
        self._workers.remove(worker)
        self._recycler.submit(worker, *self._profiles[worker.network])

    def _adopt(self) -> None:
        self._workers.extend(self._recycler.take())

    def _spawn(self, network: bool) -> Worker:
        blob, policy = self._profiles[network]
        return procs.spawn(blob, policy)

    def _network_of(self, name: str) -> bool:
        tool = self._by_name.get(name)
        return bool(tool.network) if tool is not None else min(self._profiles)
