"""The sandbox of a tool worker, applied once when the worker starts (see `worker_main.py`).

- Hard limits: data memory (RLIMIT_DATA, so a huge allocation is a MemoryError), file size
  (RLIMIT_FSIZE; SIGXFSZ ignored, so too large a write is an OSError) and no core dumps.
- A per-call CPU budget: `set_cpu_budget` moves the soft RLIMIT_CPU at each call's start; the
  kernel's SIGXCPU then raises `CpuTimeExceeded` inside the running hook (`run_hook`). The
  parent's wall-clock timeout is the backstop (code stuck in C, or catching the exception).
- File writes only beneath the worker's temp root and /dev/shm, and to /dev/null: by
  Landlock where the kernel has it, and always by an audit hook that turns such a write into a
  readable PermissionError (the only barrier where Landlock is missing). Reads and the network
  stay open. Landlock ABI >= 6 also stops signals and abstract-socket connections to processes
  outside the sandbox; the audit hook refuses connecting to filesystem unix sockets outside
  the temp root (the forkserver's would fork unconfined processes), though code calling libc
  through ctypes could still do it.
- A root worker drops its capabilities, so it cannot raise the hard limits again; the audit
  hook also refuses rlimit changes from Python, except the soft CPU limit.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import resource
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Limits:
    cpu_time_s: int
    memory_mb: int
    file_size_mb: int
    nice: int = 0


class CpuTimeExceeded(BaseException):
    """Raised inside the running hook when the call has used its CPU time (SIGXCPU)."""


_in_hook = False
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446   # same on x86-64 and arm64
_WRITE_FILE, _REFER, _TRUNCATE = 1 << 1, 1 << 13, 1 << 14
_MAKE_AND_REMOVE = sum(1 << bit for bit in range(4, 13))    # remove dir/file, make char..sym (ABI 1)
# ABI 6: no signals, and no connecting to abstract unix sockets (the forkserver's), out of the sandbox
_SCOPES = (1 << 0) | (1 << 1)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _on_sigxcpu(signum: int, frame: Any) -> None:
    if _in_hook:
        raise CpuTimeExceeded("CPU time limit exceeded")


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(number: int, *args: Any) -> int:
    return _libc.syscall(ctypes.c_long(number), *args)


def _prctl(option: int, value: int) -> int:
    return _libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(v) for v in (value, 0, 0, 0)))


def apply_sandbox(temp_root: str, limits: Limits) -> int:
    """Confine this (fresh, single-threaded) worker; returns the Landlock ABI enforced, or 0."""
    os.setpgid(0, 0)                                       # its own group: killed with its children
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)              # the forkserver gone -> gone too
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # the parent decides when workers stop
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # too large a write -> OSError (EFBIG)
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    for limit, mb in ((resource.RLIMIT_DATA, limits.memory_mb), (resource.RLIMIT_FSIZE, limits.file_size_mb)):
        resource.setrlimit(limit, (mb << 20, mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.nice(limits.nice)        # below the engine: on a shared CPU, decoding keeps its cycles
    _set_environment(temp_root)
    abi = _landlock(temp_root)
    if os.geteuid() == 0:
        _drop_capabilities()
    sys.addaudithook(_WriteGuard(temp_root))
    return abi


def _set_environment(temp_root: str) -> None:
    """Temp files, caches and matplotlib inside the temp root; one BLAS/OpenMP thread."""
    os.environ.update(TMPDIR=temp_root, MPLBACKEND="Agg", MPLCONFIGDIR=os.path.join(temp_root, ".matplotlib"),
                      XDG_CACHE_HOME=os.path.join(temp_root, ".cache"),
                      OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tempfile.tempdir = temp_root
    sys.dont_write_bytecode = True
    os.chdir(temp_root)


def _landlock(temp_root: str) -> int:
    """Allow writes only beneath temp_root and /dev/shm, and to /dev/null; reads stay open."""
    abi = _syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))   # ..._VERSION
    if abi <= 0:
        return 0
    rights = _WRITE_FILE | _MAKE_AND_REMOVE | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(rights, 0, _SCOPES if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else 8
    ruleset = _check(_syscall(_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        for path, allowed in ((temp_root, rights), ("/dev/shm", rights), ("/dev/null", rights & (_WRITE_FILE | _TRUNCATE))):
            with contextlib.suppress(FileNotFoundError):
                _allow(ruleset, path, allowed)
        _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(_syscall(_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, allowed: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(allowed, fd)
        _check(_syscall(_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1),    # PATH_BENEATH
                        ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _drop_capabilities() -> None:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3, this thread
    _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> (path argument, dir_fd argument or None) of each path it writes
_WRITE_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((1, 3),), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
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
        elif event == "socket.connect" and args[0].family == socket.AF_UNIX and args[1][:1] not in ("\0", b"\0"):
            self._check(args[1], None)        # e.g. the forkserver's socket: it forks unconfined processes
        elif event in ("resource.setrlimit", "resource.prlimit"):
            limit, new = args[-2:]
            if new is not None and limit != resource.RLIMIT_CPU:
                raise PermissionError(errno.EPERM, "tool code may not change resource limits")

    def _check(self, path: Any, dir_fd: int | None) -> None:
        if isinstance(path, int):
            return                                         # an open file descriptor
        name = os.fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(name):
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        real = os.path.realpath(name)
        if real == "/dev/null" or any(real == r or real.startswith(r + "/") for r in self.roots):
            return
        raise PermissionError(errno.EACCES, f"tools may write only inside their working directory "
                                            f"({os.getcwd()}), not to", name)


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
