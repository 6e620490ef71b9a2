"""Tool worker processes themselves: start one from the forkserver, send to it, stop it, and
stop the forkserver once no pool uses it. `workers.WorkerPool` decides what they do.

The forkserver preloads `forkserver_init` first, which wipes the environment it inherited, so
no worker starts with the server's secrets."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing import spawn as spawn_module
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from conveyor.tools import cgroups, zygote
from conveyor.tools import worker_main as wm
from conveyor.tools.namespaces import WRITABLE
from conveyor.tools.sandbox import Policy

log = logging.getLogger(__name__)
STOP_GRACE_S = 1.0  # workers exit within this after Stop, or are killed
_ctx = multiprocessing.get_context("forkserver")
_num_open_pools = 0  # the forkserver is stopped when the last pool closes


@dataclass(slots=True, eq=False)
class Worker:
    process: BaseProcess
    conn: Connection | None  # to the process serving its next or current call (None: being reset)
    network: bool  # its profile: serves the tools that need the network
    temp_root: str = WRITABLE  # inside its own file system, unless its sandbox has none
    control: socket.socket | None = None  # to its zygote (`zygote.py`), once Ready said it has one
    ready: bool = False  # a process that never ran a call waits for one
    served: bool = False  # it was given a call: the process is discarded after that one
    call_id: str | None = None
    cancelling: bool = False  # Cancel sent, acknowledgement awaited
    deadline: float = math.inf  # the call's timeout, or the cancel acknowledgement's
    num_unbegun: int = 0  # messages sent that its main thread has not taken yet
    running: bool = False  # between a Began and the next Idle: running a tool's code
    handing_off: bool = False  # sent new work while caught up: the next poll waits for Began
    cpu_mark: tuple[float, float] | None = None  # (wall, CPU demand seconds) when last measured while running
    call_pid: int | None = None  # the process serving its call, found on first use (`cpu_demand_seconds`)


def open_pool(preload: list[str]) -> None:
    """Count a pool in; `preload`: modules the forkserver imports once for every worker."""
    global _num_open_pools
    _ctx.set_forkserver_preload(["conveyor.tools.forkserver_init", *preload])
    if _num_open_pools == 0:
        cgroups.sweep()
    _num_open_pools += 1


def package_root(module: str) -> str:
    """The directory its top-level package (or module) is imported from: what a worker reads."""
    top = sys.modules.get(module.partition(".")[0])
    path = getattr(top, "__file__", None) or next(iter(getattr(top, "__path__", [])), None)
    if path is None:
        return "/nonexistent"
    return (
        os.path.dirname(os.path.dirname(path))
        if os.path.basename(path) == "__init__.py"
        else os.path.dirname(path)
    )


def _preparation_data(name: str) -> dict[str, Any]:
    """multiprocessing's start data, less the parent's main module for workers whose tools do
    not live there: importing it (the CLI, pytest) made each worker's start 130-150 ms longer,
    and a worker now serves one call."""
    data = _parent_preparation_data(name)
    if name == _NO_MAIN:
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


_NO_MAIN = "conveyor-tool-worker"
_parent_preparation_data = spawn_module.get_preparation_data
spawn_module.get_preparation_data = _preparation_data


def spawn(tools_blob: bytes, policy: Policy) -> Worker:
    """Start one worker (it says Ready when its tools are loaded and it is sandboxed); it
    imports the main module only if a tool refers to it."""
    needs_main = b"__main__" in tools_blob
    conn, child_conn = _ctx.Pipe()
    process = _ctx.Process(
        target=wm.serve,
        args=(child_conn, tools_blob, policy),
        name=f"{_NO_MAIN}-main" if needs_main else _NO_MAIN,
        daemon=True,
    )
    try:
        process.start()
    finally:
        child_conn.close()
    return Worker(process, conn, policy.network)


def send(worker: Worker, msg: Any) -> None:
    """Send `msg`; a dead worker is noticed by the pool's poll (its exit), not here."""
    if worker.conn is None:
        return  # being reset: no call is bound to it
    if worker.num_unbegun == 0 and not isinstance(msg, wm.Stop):
        worker.handing_off = True
    worker.num_unbegun += 1
    with contextlib.suppress(OSError):
        worker.conn.send(msg)


def become_zygote(worker: Worker) -> None:
    """Ready said the worker forks a process per call: its pipe so far is the zygote's control
    channel; the first call process's pipe follows on it (`take_call_process`)."""
    assert worker.conn is not None
    worker.control = socket.socket(fileno=os.dup(worker.conn.fileno()))
    worker.conn.close()
    worker.conn = None


def take_call_process(worker: Worker) -> None:
    """The zygote sent its next call process's pipe (EOFError, OSError or ValueError if not)."""
    assert worker.control is not None
    conn = zygote.receive(worker.control)
    if worker.conn is not None:  # it was not asked for one
        conn.close()
        raise ValueError("a worker's zygote sent a call process it was not asked for")
    worker.conn, worker.ready, worker.served, worker.call_pid = conn, True, False, None
    worker.deadline, worker.num_unbegun, worker.handing_off = math.inf, 0, False


def next_call(worker: Worker) -> None:
    """The call is over: drop its process's pipe and have the zygote reset the worker and fork
    the next one, within `zygote.RESET_TIMEOUT_S` (else the pool replaces the worker)."""
    assert worker.control is not None and worker.conn is not None
    worker.conn.close()
    worker.conn, worker.ready = None, False
    worker.deadline = time.perf_counter() + zygote.RESET_TIMEOUT_S + STOP_GRACE_S
    with contextlib.suppress(OSError):
        worker.control.send(zygote.NEXT)  # one byte: never blocks; a dead zygote shows as an EOF


def free(worker: Worker) -> None:
    """The worker's call is over (done or cancelled): it runs no tool code now, even if its
    `Idle` comes later (the engine must not keep a core from the forward pass meanwhile)."""
    worker.call_id, worker.cancelling, worker.deadline, worker.running = None, False, math.inf, False
    worker.cpu_mark = None


def cpu_demand_seconds(worker: Worker) -> float:
    """Seconds the process serving the worker's call has run on a CPU or waited in a run queue
    for one (its main thread, which runs the hooks: `/proc/<pid>/schedstat`); 0.0 once gone.
    The wait counts because a hook starved of a core wants one just as much: CPU time alone
    fell below half the wall clock under load, and the engine then kept the core it should
    leave. Where the kernel keeps no schedstat, CPU time (user + system) alone. In its own
    namespaces the process is the zygote's child, the great-grandchild of the process we
    started (see `namespaces.py`)."""
    try:
        if worker.call_pid is None:  # found once per call process
            pid = worker.process.pid
            for _ in range(3 if worker.control is not None else 2 if worker.temp_root == WRITABLE else 0):
                pid = _first_child(pid)
            worker.call_pid = pid
        if not _SCHEDSTAT:
            times = psutil.Process(worker.call_pid).cpu_times()
            return times.user + times.system
        with open(f"/proc/{worker.call_pid}/schedstat", "rb") as f:
            run_ns, wait_ns = f.read().split()[:2]
    except (psutil.Error, OSError, ValueError, IndexError):
        return 0.0
    return (int(run_ns) + int(wait_ns)) / 1e9


def _first_child(pid: int) -> int:
    """A child of `pid` from the kernel's list of its main thread's children (one small read;
    psutil's `children()` reads every process's stat file: 5 ms here, on the engine's thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return int(f.read().split()[0])
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN, or `pid` is gone
        return psutil.Process(pid).children()[0].pid


_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def exit_text(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def stop(worker: Worker, grace_s: float) -> None:
    """Let the worker exit within grace_s, then kill its process group; clean up after it."""
    if worker.control is not None:
        worker.control.close()  # its zygote's EOF: the worker exits
    worker.process.join(grace_s)
    if worker.process.exitcode is None:
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)  # with any children it started
        except OSError:
            worker.process.kill()  # not yet the leader of its own group
        worker.process.join(STOP_GRACE_S)
    if worker.conn is not None:
        worker.conn.close()
    cgroups.remove(worker.process.pid)
    own = os.path.join(tempfile.gettempdir(), "conveyor-worker-")  # never what else a worker names
    if worker.temp_root.startswith(own) and "/" not in worker.temp_root[len(own) :]:
        shutil.rmtree(worker.temp_root, ignore_errors=True)  # a sandbox without its own file system


class Recycler:
    """A thread that stops discarded workers and starts their replacements, so the engine's
    thread never waits for either (a kill and a forkserver round trip took 5-170 ms under
    load here). Replacements come out of `fresh`; a byte on `wake_fd` says one is there."""

    def __init__(self) -> None:
        self.fresh: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[Worker, bytes, Policy] | None] = queue.SimpleQueue()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        self._thread = threading.Thread(target=self._run, name="conveyor-worker-recycler", daemon=True)
        self._thread.start()

    def submit(self, worker: Worker, tools_blob: bytes, policy: Policy) -> None:
        """Kill `worker` (at once: nothing of its call may go on) and start a replacement."""
        with contextlib.suppress(OSError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        self._jobs.put((worker, tools_blob, policy))

    def take(self) -> list[Worker]:
        """The replacements started since the last call."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_fd, 4096)
        workers = []
        while not self.fresh.empty():
            workers.append(self.fresh.get())
        return workers

    def close(self) -> list[Worker]:
        """Stop the thread (after its jobs); returns replacements nobody took."""
        self._jobs.put(None)
        self._thread.join(STOP_GRACE_S * 10)
        workers = self.take()
        os.close(self.wake_fd)
        os.close(self._wake_w)
        return workers

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            worker, tools_blob, policy = job
            stop(worker, grace_s=0.0)
            try:
                self.fresh.put(spawn(tools_blob, policy))
            except Exception:
                log.exception("could not start a tool worker")
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"w")


def shutdown(workers: list[Worker], recycler: Recycler) -> None:
    """Stop every worker; the forkserver too once no pool is open."""
    global _num_open_pools
    workers.extend(recycler.close())
    for worker in workers:
        send(worker, wm.Stop())
    deadline = time.perf_counter() + STOP_GRACE_S
    for worker in workers:
        stop(worker, grace_s=max(0.0, deadline - time.perf_counter()))
    workers.clear()
    _num_open_pools -= 1
    if _num_open_pools == 0:
        _stop_forkserver()


def _stop_forkserver() -> None:
    server = forkserver._forkserver
    if server._forkserver_pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(server._forkserver_pid, signal.SIGTERM)  # so the wait below cannot hang on a forked
    server._stop()  # child holding the "alive" pipe
