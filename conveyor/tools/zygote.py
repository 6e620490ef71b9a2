"""The zygote: a worker's confined process that never runs tool code and forks one process per
call, so a call gets a fresh process without a fresh sandbox (see `namespaces.py` for the
stages W0-W2; the zygote is W2 once `sandbox.enter` has confined it).

The zygote holds a control socket to the pool (the worker's first pipe, which no call process
keeps). For each call it makes a new socket pair, forks the call process, which serves that
one call over its end (`worker_main._Server`), and hands the other end to the pool with
SCM_RIGHTS (`FORKED`). When the pool says the call is over (`NEXT`), the zygote resets the
worker: it kills every other process of its PID namespace (`kill(-1)` spares only itself and
the namespace's init, and reaches nothing outside the namespace), waits until none is left
(zombies reaped), empties /sandbox and /dev/shm, removes the IPC namespace's SysV objects (POSIX
message queues are refused by the seccomp filter), and forks the next call process. So
nothing a call's code started, wrote or left in its pipe reaches the next call. The zygote
reads single command bytes only; an EOF, an unknown byte or a reset that cannot finish ends
it, and with it the worker (the pool replaces it).

Only for workers in their own namespaces: without a PID namespace `kill(-1)` would reach the
host's processes, so such a worker serves one call and is discarded (`worker_main.serve`).
`kill(-1)` is sent only by `_kill_others`, which first checks `confined` itself: the process
must be in a PID namespace other than the server's and the host init's (their namespaces'
inodes come from the pool in the worker's `Policy`, read in the server's process), not its
namespace's init, and a child of that init. Anything else ends the worker instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

NEXT = b"N"  # pool -> zygote: the call is over; reset and fork the next call process
FORKED = b"F"  # zygote -> pool, with the next call process's pipe attached
RESET_TIMEOUT_S = 2.0  # the other processes of the namespace are gone within this, or the worker ends
_IPC_RMID = 0
_libc = ctypes.CDLL(None, use_errno=True)
_kill = os.kill  # the one way `_kill_others` signals (tests replace it with a recorder)


class Unconfined(RuntimeError):
    """This process is not provably alone in a PID namespace of its own: no reset may run."""


def outer_pid_namespaces() -> tuple[int, ...]:
    """In the server: the inodes of its own PID namespace and (where readable) the host init's,
    which a zygote must not be in (`confined`)."""
    found = [os.stat("/proc/self/ns/pid").st_ino]
    with contextlib.suppress(OSError):
        found.append(os.stat("/proc/1/ns/pid").st_ino)
    return tuple(dict.fromkeys(found))


def own_pid_namespace() -> int:
    """This process's PID namespace inode, from an nsfs file held open (whatever /proc shows)."""
    fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def confined(outer: tuple[int, ...]) -> str:
    """Why this process may not kill every other process of its PID namespace; "" if it may:
    it is in a PID namespace that is none of `outer` (the server's, the host's), it is not that
    namespace's init, and its parent is."""
    if not outer:
        return "the server's PID namespace is unknown"
    if own_pid_namespace() in outer:
        return "it is in the server's or the host's PID namespace"
    if os.getpid() == 1:
        return "it is its PID namespace's init"
    if os.getppid() != 1:
        return "its parent is not its PID namespace's init"
    return ""


def _kill_others(outer: tuple[int, ...]) -> None:
    """SIGKILL every process of the namespace but this one and init; Unconfined (and nothing
    sent) unless `confined(outer)` passes, checked here, right before the signal."""
    if why := confined(outer):
        raise Unconfined(f"refusing to reset a tool worker: {why}")
    with contextlib.suppress(ProcessLookupError):
        _kill(-1, signal.SIGKILL)


def run(
    control: socket.socket, serve_call: Callable[[Connection], None], temp_root: str, outer: tuple[int, ...]
) -> None:
    """The zygote's loop: fork a call process and hand its pipe over; on NEXT reset and repeat.
    Returns when the pool is gone or the worker cannot be reset (the worker then ends)."""
    if confined(outer):
        return
    while True:
        _fork_call(control, serve_call)
        try:
            command = control.recv(1)
        except OSError:
            return
        if command != NEXT or not reset(temp_root, outer):
            return


def _fork_call(control: socket.socket, serve_call: Callable[[Connection], None]) -> None:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the call process: it holds nothing but its own pipe
        try:
            control.close()
            ours.close()
            serve_call(Connection(theirs.detach()))
        finally:
            os._exit(0)
    theirs.close()
    try:
        socket.send_fds(control, [FORKED], [ours.fileno()])
    except OSError:
        pass  # the pool is gone: the next recv says so
    ours.close()


def reset(temp_root: str, outer: tuple[int, ...]) -> bool:
    """Kill every other process of the namespace, then empty the writable places and the IPC
    namespace; False if that cannot be done (a process that will not die, a file that stays)
    or may not be done (`confined`: then nothing is signalled, emptied or removed)."""
    deadline = time.monotonic() + RESET_TIMEOUT_S
    while True:
        try:
            _kill_others(outer)
        except Unconfined:
            return False
        except OSError:
            pass
        _reap()
        if not _others():
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)  # SIGKILLed processes leave within the kernel's exit path
    try:
        for directory in (temp_root, "/dev/shm"):
            _empty(directory)
        _remove_sysv_ipc()
    except (OSError, RecursionError):
        return False
    return True


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _others() -> list[int]:
    """Processes of the namespace but init and this one, zombies too (a zombie leader whose
    other threads still exit cannot be reaped yet; init reaps the orphans)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) not in (1, os.getpid())]


def _empty(directory: str) -> None:
    """Remove everything in `directory` (modes a call set are undone first)."""
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            os.chmod(entry.path, stat.S_IRWXU)
            _empty(entry.path)
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


def _remove_sysv_ipc() -> None:
    """Remove the SysV shared memory segments, semaphore sets and message queues of this
    worker's IPC namespace (what /proc/sysvipc lists there)."""
    removers = {
        "shm": lambda i: _libc.shmctl(i, _IPC_RMID, None),
        "sem": lambda i: _libc.semctl(i, 0, _IPC_RMID),
        "msg": lambda i: _libc.msgctl(i, _IPC_RMID, None),
    }
    for kind, remove in removers.items():
        with open(f"/proc/sysvipc/{kind}") as f:
            ids = [int(line.split()[1]) for line in f.readlines()[1:] if line.strip()]
        for ipc_id in ids:
            if remove(ctypes.c_int(ipc_id)) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"removing SysV {kind} {ipc_id}: {os.strerror(err)}")


def receive(control: socket.socket) -> Connection:
    """The pool's side: the next call process's pipe, which the zygote just sent (the control
    socket is readable). EOFError if the zygote is gone, ValueError for anything but FORKED."""
    data, fds, _, _ = socket.recv_fds(control, 1, 1)
    if not data:
        raise EOFError("the worker's zygote is gone")
    if data != FORKED or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("a malformed message from a worker's zygote")
    return Connection(fds[0])
