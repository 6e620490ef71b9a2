"""The sandbox of a tool worker, entered once when the worker starts (see `worker_main.py`).

Layers, outermost first (`enter`; each one that cannot be had is named in the `Report`):
- cgroups (`cgroups.py`, as root): memory and process-count limits over the worker and all
  it starts. Without them: RLIMIT_AS (per process) and RLIMIT_NPROC (per uid in the worker's
  user namespace) instead.
- namespaces (`namespaces.py`): own PID, mount, IPC, UTS, user and network namespaces; a root
  file system of read-only binds of what the tools need, a fresh /proc, a private tmpfs at
  /sandbox as the only writable place (and /dev/shm); an unprivileged uid; the worker and
  every process it starts die together.
- the process itself: an empty environment (the forkserver already wiped the server's, see
  `forkserver_init.py`), no inherited file descriptors but its pipe, hard limits on data
  memory (RLIMIT_DATA: a huge allocation is a MemoryError), file size (RLIMIT_FSIZE; SIGXFSZ
  ignored, so too large a write is an OSError) and core dumps; a per-call CPU budget
  (`set_cpu_budget` moves the soft RLIMIT_CPU; SIGXCPU raises `CpuTimeExceeded` in the
  running hook, `run_hook`; the parent's wall-clock timeout is the backstop).
- `confine.py`: PR_SET_NO_NEW_PRIVS, no capabilities, a seccomp filter, Landlock on writes.
- an audit hook (`_WriteGuard`): readable PermissionErrors for what Python code tries that
  the layers below refuse anyway (writes outside the sandbox, unix-socket connections, rlimit
  changes), counted as refusals. It is a convenience, not a barrier: code in C, ctypes or a
  subprocess bypasses it and meets the kernel's refusals instead.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools import cgroups, confine, namespaces
from conveyor.tools.namespaces import WRITABLE, View

REQUIRED = ("namespaces", "seccomp", "no_new_privs")  # what the `python` tool needs, or --unsafe-tools


@dataclass(frozen=True, slots=True)
class Limits:
    cpu_time_s: int
    memory_mb: int
    file_size_mb: int
    nice: int = 0
    max_processes: int = 64


@dataclass(frozen=True, slots=True)
class Policy:
    """What a worker's sandbox is made of (the pool computes it; see `workers.py`)."""

    limits: Limits
    view: View
    uid: int = 60100  # the uid workers run as when the server runs as root
    network: bool = False  # share the host's network namespace (tools that declare it)
    outer_pid_ns: tuple[int, ...] = ()  # the server's and the host's PID namespaces (`zygote.confined`)


@dataclass(frozen=True, slots=True)
class Report:
    """What a worker's sandbox provides: `applied` layers, `missing` ones as (layer, why)."""

    applied: tuple[str, ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    landlock_abi: int = 0
    temp_root: str = WRITABLE

    @property
    def isolated(self) -> bool:
        """In namespaces of its own (its own PID namespace: a zygote may serve its calls)."""
        return self.temp_root == WRITABLE and not any(layer == "namespaces" for layer, _ in self.missing)

    def missing_required(self) -> list[str]:
        return [f"{layer} ({why})" for layer, why in self.missing if layer in REQUIRED]


class CpuTimeExceeded(BaseException):
    """Raised inside the running hook when the call has used its CPU time (SIGXCPU)."""


_in_hook = False
_refusals = 0


def _on_sigxcpu(signum: int, frame: Any) -> None:
    if _in_hook:
        raise CpuTimeExceeded("CPU time limit exceeded")


@dataclass(slots=True)
class _Layers:
    applied: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)

    @contextlib.contextmanager
    def layer(self, name: str) -> Any:
        try:
            yield
        except OSError as e:
            self.missing.append((name, str(e)))


def enter(policy: Policy, conn_fd: int) -> Report:
    """Confine this fresh, single-threaded worker (it returns in the process that serves calls,
    see `namespaces.enter`); raises nothing the kernel refuses, but reports it."""
    _close_inherited(conn_fd)
    os.setpgid(0, 0)  # its own group: killed with its children
    namespaces.die_with_parent()  # the forkserver gone -> gone too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    layers, limits, root = _Layers(), policy.limits, os.geteuid() == 0
    cgroup = False
    with layers.layer("cgroups"):
        layers.applied += cgroups.join(limits.memory_mb, limits.max_processes) if root else []
        cgroup = root
    temp_root = WRITABLE
    with layers.layer("namespaces"):
        layers.applied += namespaces.enter(policy.view, policy.uid, policy.network, (conn_fd,))
    isolated = not any(name == "namespaces" for name, _ in layers.missing)
    if not isolated:
        temp_root = tempfile.mkdtemp(prefix="conveyor-worker-")
    _set_limits(limits, address_space=not cgroup, processes=isolated)
    _set_environment(temp_root)
    with layers.layer("no_new_privs"):
        confine.no_new_privs()
    with layers.layer("seccomp"):
        confine.install_seccomp()
        layers.applied.append("seccomp filter")
    with layers.layer("capabilities"):
        confine.drop_capabilities()
    abi = 0
    with layers.layer("landlock"):
        abi = confine.landlock((temp_root, "/dev/shm"))
    sys.addaudithook(_WriteGuard(temp_root))
    return Report(tuple(layers.applied), tuple(layers.missing), abi, temp_root)


def _close_inherited(conn_fd: int) -> None:
    """Keep only the pipe to the pool: stdio on /dev/null, no other descriptor of the server's or
    the forkserver's (e.g. multiprocessing's resource tracker, which unlinks what it is told)."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, conn_fd)
    os.closerange(conn_fd + 1, 65536)
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._fd = None  # closed above; a new one would be ours


def _set_limits(limits: Limits, *, address_space: bool, processes: bool) -> None:
    """Hard limits; `processes`: RLIMIT_NPROC too, which counts the processes of the worker's uid
    in its own user namespace (outside one it would count all of the uid's on the host)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too large a write -> OSError (EFBIG)
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    hard = [
        (resource.RLIMIT_DATA, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
        (resource.RLIMIT_CORE, 0),
    ] + ([(resource.RLIMIT_NPROC, limits.max_processes)] if processes else [])
    if address_space:  # no memory cgroup: at least each process's mappings are bounded
        hard.append((resource.RLIMIT_AS, (limits.memory_mb + 1024) << 20))
    for limit, value in hard:
        resource.setrlimit(limit, (value, value))
    os.nice(limits.nice)  # below the engine: on a shared CPU, decoding keeps its cycles


def _set_environment(temp_root: str) -> None:
    """An environment of our own only: temp files, caches and matplotlib inside the temp root;
    one BLAS/OpenMP thread."""
    os.environ.clear()
    os.environ.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME=temp_root,
        TMPDIR=temp_root,
        LANG="C.UTF-8",
        MPLBACKEND="Agg",
        MPLCONFIGDIR=os.path.join(temp_root, ".matplotlib"),
        XDG_CACHE_HOME=os.path.join(temp_root, ".cache"),
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    tempfile.tempdir = temp_root
    sys.dont_write_bytecode = True
    os.chdir(temp_root)


_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "resolv.conf",
    "gai.conf",
    "services",
    "protocols",
    "mime.types",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "os-release",
    "fonts",
)


def default_view(extra: list[str], hidden: list[str], tmpfs_mb: int) -> View:
    """The file system of a worker: the system's libraries and programs, a few files of /etc,
    the interpreter and every sys.path entry (the current directory if '' is one), plus
    `extra` (the tools' modules and files); `hidden` paths (the model cache) stay empty."""
    paths = [
        *_SYSTEM,
        *(f"/etc/{name}" for name in _ETC),
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        *(os.getcwd() if p == "" else p for p in sys.path),
        *extra,
    ]
    kept: list[str] = []
    for path in sorted({os.path.abspath(p) for p in paths if os.path.exists(p)}):
        linked = path in _SYSTEM and os.path.islink(path)  # merged /usr: the link is made
        if path != "/" and not linked and not any(path.startswith(k + "/") for k in kept):
            kept.append(path)
    return View(tuple(kept), tuple(os.path.abspath(h) for h in hidden), tmpfs_mb)


def take_refusals() -> int:
    """Refusals by the audit hook since the last call (see `_WriteGuard`)."""
    global _refusals
    count, _refusals = _refusals, 0
    return count


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> (path argument, dir_fd argument or None) of each path it writes
_WRITE_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((1, 3),),
    "os.symlink": ((1, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
}


class _WriteGuard:
    """Audit hook: PermissionError for file writes and unix-socket connections outside the temp
    root, and for rlimit changes (only the soft CPU limit, which the worker sets per call, may
    change)."""

    def __init__(self, temp_root: str) -> None:
        self.roots = (os.path.realpath(temp_root), "/dev/shm")

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS:
                self._check(path, None)
        elif event in _WRITE_EVENTS:
            for path_index, fd_index in _WRITE_EVENTS[event]:
                self._check(args[path_index], None if fd_index is None else args[fd_index])
        elif (
            event == "socket.connect"
            and args[0].family == socket.AF_UNIX
            and args[1][:1] not in ("\0", b"\0")
        ):
            self._check(args[1], None)  # e.g. the forkserver's socket: it forks unconfined processes
        elif event in ("resource.setrlimit", "resource.prlimit"):
            limit, new = args[-2:]
            if new is not None and limit != resource.RLIMIT_CPU:
                _refuse()
                raise PermissionError(errno.EPERM, "tool code may not change resource limits")

    def _check(self, path: Any, dir_fd: int | None) -> None:
        if isinstance(path, int):
            return  # an open file descriptor
        name = os.fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(name):
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        real = os.path.realpath(name)
        if real == "/dev/null" or any(real == r or real.startswith(r + "/") for r in self.roots):
            return
        _refuse()
        raise PermissionError(
            errno.EACCES, f"tools may write only inside their working directory ({os.getcwd()}), not to", name
        )


def _refuse() -> None:
    global _refusals
    _refusals += 1


def set_cpu_budget(cpu_time_s: int) -> None:
    """Let the process use `cpu_time_s` more CPU seconds before SIGXCPU."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    budget = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_time_s
    resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))


def run_hook(hook: Any, *args: Any) -> Any:
    """Run a tool hook with the CPU-time signal armed."""
    global _in_hook
    _in_hook = True
    try:
        return hook(*args)
    finally:
        _in_hook = False
