"""WorkerPool: results and timings, parallel calls and queueing, rejection, cancel, crashes,
limits (CPU, memory, file writes) and clean shutdown. One pool serves most tests; each test
leaves it idle (a failed one's open calls are cancelled). Tests wait on the pool's replies
and counters, never for a fixed time, so they hold at any load; the windows that remain are
the pool's own bounds (the hand-off cap, the call timeout)."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import time
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import psutil
import pytest

from conveyor.config import ToolConfig
from conveyor.tools import worker_procs
from conveyor.tools.base import CallInfo, Tool, ToolRegistry, ToolRejected, ToolResult
from conveyor.tools.builtin.python import PythonTool
from conveyor.tools.workers import WorkerPool

REPO = Path(__file__).resolve().parents[2]
CONFIG = ToolConfig(num_workers=2, call_timeout_s=3, cpu_time_s=2, handoff_ms=300, worker_nice=5)


class EchoTool(Tool):
    name = "echo"
    side_effects = "none"

    def start(self, call: CallInfo) -> None:
        self.seen: list[str] = []

    def on_field(self, key: str, value: Any) -> None:
        self.seen.append(f"{key}={value}")

    def on_line(self, line: str) -> None:
        self.seen.append(line)

    def finish(self, args: dict[str, Any]) -> Any:
        return {
            "seen": self.seen,
            "args": args,
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }


class WaitTool(Tool):
    """A tool whose hook waits (as on the network) and says so."""

    name = "wait"
    side_effects = "none"
    cpu_bound = False

    def on_field(self, key: str, value: Any) -> None:
        time.sleep(value)

    def finish(self, args: dict[str, Any]) -> str:
        return "waited"


class RejectTool(Tool):
    name = "reject"

    def on_field(self, key: str, value: Any) -> None:
        if value < 0:
            raise ToolRejected(f"{key} must be >= 0, got {value}")

    def finish(self, args: dict[str, Any]) -> str:
        return "accepted"


class CrashTool(Tool):
    name = "crash"

    def finish(self, args: dict[str, Any]) -> str:
        os._exit(1)


class UnpicklableTool(Tool):
    name = "unpicklable"

    def __init__(self) -> None:
        self.fn = lambda: None

    def finish(self, args: dict[str, Any]) -> str:
        return ""


def _cannot_load() -> Tool:
    raise ValueError("this tool cannot be loaded here")


class UnloadableTool(Tool):
    name = "unloadable"

    def __reduce__(self) -> Any:
        return _cannot_load, ()


_ids = itertools.count()


def run_call(
    pool: WorkerPool,
    name: str,
    fields: dict[str, Any] | None = None,
    lines: tuple[str, ...] = (),
    args: dict[str, Any] | None = None,
) -> ToolResult:
    """Open a call, send its fields and lines, finish it and wait for its result."""
    call_id = open_call(pool, name)
    for key, value in (fields or {}).items():
        pool.send_field(call_id, key, value, time.perf_counter())
    for line in lines:
        pool.send_line(call_id, line, time.perf_counter())
    pool.finish(call_id, args if args is not None else dict(fields or {}))
    return wait_results(pool, {call_id})[call_id]


def open_call(pool: WorkerPool, name: str) -> str:
    call_id = f"call-{next(_ids)}"
    pool.open_call(CallInfo(call_id, name, "request"), time.perf_counter())
    return call_id


def wait_results(pool: WorkerPool, call_ids: set[str], timeout_s: float = 15.0) -> dict[str, ToolResult]:
    results: dict[str, ToolResult] = {}
    deadline = time.perf_counter() + timeout_s
    while set(results) != call_ids:
        assert time.perf_counter() < deadline, f"no result for {call_ids - set(results)}"
        results.update((r.call_id, r) for r in pool.poll(0.5))
    return results


def wait_until(pool: WorkerPool, condition: Any, timeout_s: float = 15.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        pool.poll(0.05)


def python(pool: WorkerPool, *lines: str) -> ToolResult:
    return run_call(pool, "python", lines=lines, args={"code": "\n".join(lines)})


def assert_healthy(pool: WorkerPool) -> None:
    """Every worker comes back and a new call runs normally."""
    assert python(pool, "1 + 1").content == "2"
    assert (pool.num_busy, pool.num_queued) == (0, 0)


def children() -> set[int]:
    """Live child processes, less multiprocessing's resource tracker (shared; exits with us)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())
    }


# ---- own pools (first, while no other pool holds the forkserver) ---------------------------
def test_start_fails_clearly_and_leaves_no_process() -> None:
    with pytest.raises(RuntimeError, match="'unpicklable' cannot be sent to a worker"):
        WorkerPool(ToolRegistry([UnpicklableTool()]), CONFIG).start()
    before = children()
    with pytest.raises(RuntimeError, match="this tool cannot be loaded here"):
        WorkerPool(ToolRegistry([UnloadableTool()]), CONFIG).start()
    assert children() <= before


def test_close_leaves_no_worker_process() -> None:
    pool = WorkerPool(ToolRegistry([EchoTool()]), CONFIG)
    pool.start()
    workers = {w.process.pid for w in pool._workers}
    assert workers <= children()
    call_id = open_call(pool, "echo")  # a busy worker stops too
    server_pid = forkserver._forkserver._forkserver_pid
    pool.close()
    pool.close()  # idempotent
    alive = children()
    assert not workers & alive
    if worker_procs._num_open_pools == 0:  # the last pool stops the forkserver too
        assert server_pid not in alive and forkserver._forkserver._forkserver_pid is None
    with pytest.raises(KeyError):
        pool.finish(call_id, {})


# ---- one shared pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_pool():
    registry = ToolRegistry([EchoTool(), RejectTool(), CrashTool(), PythonTool(), WaitTool()])
    with WorkerPool(registry, CONFIG) as pool:
        yield pool


@pytest.fixture
def pool(shared_pool: WorkerPool) -> Iterator[WorkerPool]:
    """The shared pool once the replacements of the workers earlier tests used are ready; a
    call a failed test left open is cancelled after it, so the next test gets idle workers."""
    wait_until(shared_pool, lambda: shared_pool.num_idle == CONFIG.num_workers)
    yield shared_pool
    shared_pool.config = CONFIG
    for call_id in list(shared_pool._calls):
        shared_pool.cancel(call_id)


def patient(pool: WorkerPool) -> None:
    """The longest hand-off wait the config allows (1 s): it ends as soon as the worker has
    taken its work and gone idle (or ended its call), so only a loaded machine makes it
    longer than CONFIG's (`pool` restores CONFIG)."""
    pool.config = dataclasses.replace(CONFIG, handoff_ms=1000)


def test_result_and_hook_delays(pool: WorkerPool) -> None:
    before = time.perf_counter()
    result = run_call(pool, "echo", fields={"a": 1, "b": [2, 3]}, lines=("x = 1",))
    assert not result.is_error
    content = eval(result.content.replace("null", "None"))  # JSON of plain values
    assert content["seen"] == ["a=1", "b=[2, 3]", "x = 1"]
    assert content["args"] == {"a": 1, "b": [2, 3]}
    assert len(result.hook_delays_s) == 3 and all(0 <= d < 1 for d in result.hook_delays_s)
    assert before <= result.started_at <= result.done_at <= time.perf_counter()


def test_poll_hands_new_work_off_but_not_to_a_busy_worker(pool: WorkerPool) -> None:
    patient(pool)
    call_id = open_call(pool, "python")
    pool.send_line(call_id, "import time", time.perf_counter())
    pool.poll(0.0)
    assert [w.num_unbegun for w in pool._workers] == [0, 0]  # the worker has taken both
    assert pool.num_running == 0  # ... and run them: short hooks
    pool.config = CONFIG  # capped at CONFIG.handoff_ms from here
    pool.send_line(call_id, "time.sleep(2)", time.perf_counter())
    start = time.perf_counter()
    pool.poll(0.0)
    assert time.perf_counter() - start < 1.0  # the hand-off wait is capped
    wait_until(pool, lambda: pool.num_running == 1)  # a long one runs on after the wait
    pool.send_line(call_id, "x = 1", time.perf_counter())  # queued behind the sleep
    start = time.perf_counter()
    pool.poll(0.0)
    assert time.perf_counter() - start < 1.0  # the hand-off wait is capped
    assert sorted(w.num_unbegun for w in pool._workers) == [0, 1]
    pool.finish(call_id, {"code": "import time\ntime.sleep(2)\nx = 1"})
    result = wait_results(pool, {call_id})[call_id]
    assert not result.is_error and len(result.hook_queued_s) == 3
    assert result.hook_queued_s[2] > 1.0  # "x = 1" waited for the sleep
    assert result.hook_delays_s[2] - result.hook_queued_s[2] < 1.0
    assert pool.num_running == 0  # its Idle may follow the result; the call is over already


def test_hand_off_keeps_a_result_that_arrives_for_the_next_poll(pool: WorkerPool) -> None:
    patient(pool)
    call_id = open_call(pool, "echo")
    pool.send_field(call_id, "a", 1, time.perf_counter())
    pool.finish(call_id, {"a": 1})
    pool.hand_off()  # the short call runs and ends within the wait
    assert all(w.num_unbegun == 0 for w in pool._workers)  # (its worker is discarded already)
    results = pool.poll(0.0)
    assert [r.call_id for r in results] == [call_id] and not results[0].is_error
    assert pool.poll(0.0) == []  # handed out once


def test_a_finished_call_gives_its_core_back_before_its_idle_arrives(pool: WorkerPool) -> None:
    call_id = open_call(pool, "python")
    code = "for i in range(3000): open(f'f{i}', 'w').close()"  # removing them delays the Idle
    pool.send_line(call_id, code, time.perf_counter())
    pool.finish(call_id, {"code": code})
    assert not wait_results(pool, {call_id})[call_id].is_error
    assert pool.num_running == 0  # the engine would otherwise decode on a thread fewer


def test_num_computing_counts_a_hook_on_the_cpu_but_not_one_that_waits(pool: WorkerPool) -> None:
    call_id = open_call(pool, "python")
    worker = pool._calls[call_id].worker
    assert worker is not None
    began = lambda: worker.num_unbegun == 0 and pool.num_running == 1
    for line in ("import time", "time.sleep(2)"):
        pool.send_line(call_id, line, time.perf_counter())
    wait_until(pool, began)  # the sleep has begun
    assert pool.num_computing() == 1  # not measured yet: counted
    pool.poll(0.5)
    assert pool.num_computing() == 0  # asleep for the whole window
    busy = "t = time.perf_counter()\nwhile time.perf_counter() - t < 1.5: pass"
    pool.send_line(call_id, busy, time.perf_counter())
    wait_until(pool, began)  # the sleep is over and the loop has begun
    pool.num_computing()
    pool.poll(0.2)
    assert pool.num_computing() == 1  # on a CPU, or waiting for one, for the whole window
    pool.finish(call_id, {"code": f"import time\ntime.sleep(2)\n{busy}"})
    assert not wait_results(pool, {call_id})[call_id].is_error
    assert pool.num_computing() == 0


def test_a_hook_of_a_tool_that_waits_leaves_the_cores_to_the_forward_pass(pool: WorkerPool) -> None:
    call_id = open_call(pool, "wait")
    pool.send_field(call_id, "s", 1.0, time.perf_counter())
    wait_until(pool, lambda: pool.num_running == 1)
    assert pool.num_computing() == 0  # not cpu_bound: not counted
    pool.finish(call_id, {"s": 1.0})
    assert wait_results(pool, {call_id})[call_id].content == "waited"


def test_tool_code_runs_at_the_configured_priority(pool: WorkerPool) -> None:
    content = eval(run_call(pool, "echo").content.replace("null", "None"))
    assert content["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + CONFIG.worker_nice)


def test_parallel_calls_and_queueing(pool: WorkerPool) -> None:
    first, second, third = (open_call(pool, "echo") for _ in range(3))
    assert (pool.num_busy, pool.num_idle, pool.num_queued) == (2, 0, 1)
    pool.send_field(third, "k", "queued", time.perf_counter())
    workers = {pool._calls[c].worker.process.pid for c in (first, second)}
    for call_id in (first, second):
        pool.finish(call_id, {})
    results = wait_results(pool, {first, second})
    assert len(workers) == 2 and all(not results[c].is_error for c in (first, second))  # side by side
    wait_until(pool, lambda: pool.num_queued == 0)  # a fresh worker (each serves one call) takes it
    assert (pool.num_busy, pool.num_queued) == (1, 0)  # the queued call got a worker
    pool.finish(third, {"k": "queued"})
    result = wait_results(pool, {third})[third]
    assert '"seen": ["k=queued"]' in result.content and len(result.hook_delays_s) == 1
    assert pool.num_busy == 0


def test_rejection_is_reported_at_once(pool: WorkerPool) -> None:
    call_id = open_call(pool, "reject")
    pool.send_field(call_id, "n", -1, time.perf_counter())
    result = wait_results(pool, {call_id})[call_id]
    assert result.rejected and result.is_error and result.content == "n must be >= 0, got -1"
    pool.send_field(call_id, "m", 2, time.perf_counter())  # later messages are dropped
    pool.finish(call_id, {"n": -1, "m": 2})
    assert pool.poll(0.1) == [] and pool.num_busy == 0
    assert run_call(pool, "reject", fields={"n": 1}).content == "accepted"


def test_hook_error_is_the_result(pool: WorkerPool) -> None:
    result = run_call(pool, "reject", fields={"n": "text"})  # "text" < 0 raises TypeError
    assert result.is_error and not result.rejected and result.content.startswith("TypeError: ")


def test_cancel_frees_the_worker(pool: WorkerPool) -> None:
    call_id = open_call(pool, "echo")
    pool.send_field(call_id, "a", 1, time.perf_counter())
    pool.cancel(call_id)
    restarts = pool.num_restarts
    while pool.num_busy:
        assert pool.poll(0.5) == []
    assert pool.num_restarts == restarts  # acknowledged, not killed
    assert_healthy(pool)


def test_cancel_of_a_stuck_call_replaces_its_worker(pool: WorkerPool) -> None:
    call_id = open_call(pool, "python")
    pool.send_line(call_id, "import time; time.sleep(60)", time.perf_counter())
    pool.cancel(call_id)
    restarts = pool.num_restarts
    while pool.num_restarts == restarts:
        assert pool.poll(0.5) == []  # no result for a cancelled call
    assert_healthy(pool)


@pytest.mark.parametrize("crash", ["tool", "python"])
def test_crash_gives_an_error_and_a_new_worker(pool: WorkerPool, crash: str) -> None:
    restarts = pool.num_restarts
    if crash == "tool":
        result = run_call(pool, "crash")
    else:
        result = python(pool, "import os, signal", "os.kill(os.getpid(), signal.SIGKILL)")
    assert result.is_error and "worker process died" in result.content
    assert pool.num_restarts == restarts + 1
    assert_healthy(pool)


def test_endless_loop_hits_the_cpu_limit(pool: WorkerPool) -> None:
    result = python(pool, "print('before')", "while True: pass", "print('after')")
    assert result.is_error and (
        "CPU time limit exceeded" in result.content or "TimeoutError" in result.content
    )
    assert "after" not in result.content
    assert_healthy(pool)


def test_timeout_replaces_the_worker(pool: WorkerPool) -> None:
    restarts = pool.num_restarts
    started = time.perf_counter()
    result = python(pool, "import time", "time.sleep(60)")
    assert result.is_error and result.content.startswith("TimeoutError: ")
    assert CONFIG.call_timeout_s <= time.perf_counter() - started < CONFIG.call_timeout_s + 5
    assert pool.num_restarts == restarts + 1
    assert_healthy(pool)


def test_huge_allocation_is_a_memory_error(pool: WorkerPool) -> None:
    restarts = pool.num_restarts
    result = python(pool, "x = bytearray(10 * 2**30)")
    assert result.is_error and "MemoryError" in result.content
    assert pool.num_restarts == restarts  # the worker survived
    assert_healthy(pool)


@pytest.mark.parametrize("target", ["/tmp/conveyor-escape-test.txt", str(REPO / "conveyor-escape-test.txt")])
def test_writes_outside_the_temp_dir_are_refused(pool: WorkerPool, target: str) -> None:
    result = python(pool, f"open({target!r}, 'w').write('escaped')")
    assert result.is_error and "PermissionError" in result.content
    assert not os.path.exists(target)
    result = python(pool, f"import os; os.remove({str(REPO / 'pyproject.toml')!r})")
    assert result.is_error and "PermissionError" in result.content
    assert (REPO / "pyproject.toml").exists()


def test_the_forkserver_socket_is_out_of_reach(pool: WorkerPool) -> None:
    address = forkserver._forkserver._forkserver_address  # it would fork unconfined processes
    result = python(pool, "import socket", f"socket.socket(socket.AF_UNIX).connect({address!r})")
    assert result.is_error and "PermissionError" in result.content


def _landlock_abi() -> int:
    return ctypes.CDLL(None, use_errno=True).syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))


@pytest.mark.skipif(_landlock_abi() <= 0, reason="the kernel has no Landlock")
def test_landlock_refuses_writes_that_bypass_python(pool: WorkerPool) -> None:
    target = "/tmp/conveyor-escape-test.txt"
    code = f"import ctypes; ctypes.CDLL(None).open({target.encode()!r}, 0o101, 0o644)"  # O_WRONLY|O_CREAT
    assert python(pool, code).content == "-1"
    assert not os.path.exists(target)


def test_writes_inside_the_call_directory_work(pool: WorkerPool) -> None:
    result = python(
        pool,
        "open('out.txt', 'w').write('hello')",
        "print(open('out.txt').read())",
        "import sqlite3; db = sqlite3.connect('db.sqlite')",
        "db.execute('create table t (x)'); db.execute('insert into t values (42)')",
        "db.execute('select x from t').fetchone()[0]",
        "import tempfile; tempfile.NamedTemporaryFile().name.startswith(tempfile.gettempdir())",
    )
    assert result.content == "hello\nTrue", result.content
    for _ in range(3):  # a fresh directory per call; a worker removes its last one before the next
        result = python(
            pool,
            "import os",
            "calls = [d for d in os.listdir('..') if d.startswith('call-')]",
            "os.listdir('.'), calls == [os.path.basename(os.getcwd())]",
        )
        assert result.content == "([], True)"


def test_the_python_tool_refuses_a_sandbox_with_a_missing_layer_unless_unsafe_tools() -> None:
    from conveyor.tools.sandbox import Report

    lacking = Report(
        ("seccomp filter",), (("namespaces", "unshare: Operation not permitted"), ("landlock", "no"))
    )
    for config, registry, refused in (
        (CONFIG, [PythonTool()], True),
        (ToolConfig(num_workers=1, unsafe_tools=True), [PythonTool()], False),
        (CONFIG, [EchoTool()], False),
    ):  # tools without requires_isolation
        pool = WorkerPool(ToolRegistry(registry), config)
        pool.report = lacking
        if refused:
            with pytest.raises(
                RuntimeError,
                match=r"'python' needs an isolated sandbox.*missing namespaces "
                r"\(unshare: Operation not permitted\).*--unsafe-tools",
            ):
                pool._check_isolation()
        else:
            pool._check_isolation()


def test_no_state_survives_into_the_next_call_of_the_same_zygote() -> None:
    registry = ToolRegistry([PythonTool()])
    with WorkerPool(registry, ToolConfig(num_workers=1, call_timeout_s=10, cpu_time_s=5)) as pool:
        wait_until(pool, lambda: pool.num_idle == 1)
        if pool._workers[0].control is None:
            pytest.skip("no namespaces here: each call gets a fresh worker")
        zygote_pid = pool._workers[0].process.pid
        leave = python(
            pool,
            "import ctypes, math, os, subprocess, sys, threading, time",
            "open('/sandbox/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x')",
            "threading.Thread(target=time.sleep, args=(60,), name='left', daemon=True).start()",
            "math.sqrt = lambda x: 'patched'",
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
            "shm = ctypes.CDLL(None).shmget(0, 4096, 0o1600)",  # IPC_PRIVATE | IPC_CREAT
            "print(shm >= 0, math.sqrt(1), len(os.listdir('/proc')) > 3)",
        )
        assert leave.content.strip() == "True patched True", leave.content
        wait_until(pool, lambda: pool.num_idle == 1)
        found = python(
            pool,
            "import math, os, threading",
            "others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, 2, os.getpid())]",
            "sorted(set(os.listdir('/sandbox')) - {os.path.basename(os.getcwd())}), os.listdir('/dev/shm'), "
            "[t.name for t in threading.enumerate() if t.name == 'left'], math.sqrt(1), others, "
            "len(open('/proc/sysvipc/shm').readlines())",
        )
        assert found.content == "([], [], [], 1.0, [], 1)", found.content  # the header line only
        assert pool._workers[0].process.pid == zygote_pid and pool.num_restarts == 0  # the same zygote
