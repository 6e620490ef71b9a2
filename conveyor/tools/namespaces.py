"""Kernel namespaces for a tool worker: its own PID, mount, IPC, UTS, user and (unless a tool
needs the network) network namespace, and a file system that holds only what the tools read.

`enter` runs in the freshly forked worker process (W0, in the host's namespaces) and returns
only in W2, the process that serves the call:
- W0 unshares the namespaces (as root directly; otherwise with a user namespace first, which
  gives it the rights to mount there), forks W1 and waits for it: its exit is the worker's.
- W1 is PID 1 of the new PID namespace: the kernel kills every process in it when W1 dies,
  so no process a call started (daemons, new sessions) outlives the worker. W1 builds the new
  root (`_build_root`: a tmpfs with read-only binds of the paths given, a fresh /proc, a few
  device nodes, a private tmpfs for writing), pivots into it, drops to the sandbox uid (when
  root), enters a user namespace owned by that uid, forks W2 and reaps until W2 exits.
- Every stage dies with its parent (PR_SET_PDEATHSIG), W0 with the forkserver.

The mount calls need a process that is single-threaded (unshare of a user namespace) and has
no other work: the worker before it starts its reader thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 1 << 14, 1 << 18
MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
_KEPT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048  # + noatime, nodiratime: locked ones
WRITABLE = "/sandbox"  # the private tmpfs where tool code may write
DEVICES = ("null", "zero", "full", "random", "urandom")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class View:
    """What the worker's file system holds: read-only binds of `read_only` (each at its own path),
    `hidden` paths covered by an empty directory even inside those, and a `tmpfs_mb`-sized
    writable tmpfs at WRITABLE and at /dev/shm."""

    read_only: tuple[str, ...]
    hidden: tuple[str, ...]
    tmpfs_mb: int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, value: int) -> int:
    return _libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(v) for v in (value, 0, 0, 0)))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else os.fsencode(s)
    _check(
        _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
        f"mount({source!r} on {target!r})",
    )


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (cleared by a uid change: call again after)."""
    _check(prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")


def enter(view: View, uid: int, network: bool, child_fds: tuple[int, ...]) -> list[str]:
    """Move this worker into its namespaces (see the module docstring); returns, in W2, what
    was applied. OSError if the kernel refuses (the caller reports it as missing)."""
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID | (0 if network else CLONE_NEWNET)
    if root:
        _unshare(flags)
    else:
        uid = os.geteuid()
        _unshare(flags | CLONE_NEWUSER)
        _map_ids(uid, os.getegid())
    _fork_and_wait(child_fds)  # W0 waits here for W1, which goes on
    die_with_parent()
    _check(_libc.sethostname(b"sandbox", ctypes.c_size_t(7)), "sethostname")
    _build_root(view)
    if root:
        _drop_root(uid)
        _unshare(CLONE_NEWUSER)
        _map_ids(uid, uid)
    _fork_and_wait(child_fds)  # W1 reaps here until W2 exits; W2 goes on
    die_with_parent()
    applied = [
        "namespaces: user, pid, mount, ipc, uts" + ("" if network else ", net"),
        f"root file system: read-only binds of {len(view.read_only)} paths, writable {WRITABLE}",
    ]
    return applied + ([f"uid {uid} (not root)"] if root else [])


def _map_ids(uid: int, gid: int) -> None:
    """Map this process's own uid and gid into its new user namespace (nothing else is mapped)."""
    prctl(_PR_SET_DUMPABLE, 1)  # a uid change left /proc/self owned by root
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _drop_root(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # all capabilities go with it
    die_with_parent()


def _fork_and_wait(child_fds: tuple[int, ...]) -> None:
    """Fork; the parent (which runs no tool code) waits for the child, reaping any other
    process handed to it (it may be a PID namespace's init), then exits as the child did."""
    alive_r, alive_w = os.pipe()  # EOF for the child once the parent is gone
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        die_with_parent()
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)  # the parent died before the prctl took effect
        os.close(alive_r)
        return
    os.close(alive_r)
    for fd in child_fds:
        with contextlib.suppress(OSError):
            os.close(fd)  # only the child keeps these (the pipe to the pool: EOF when the child dies)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        with contextlib.suppress(ChildProcessError, InterruptedError):
            done, status = os.wait()
            if done == pid:
                code = os.waitstatus_to_exitcode(status)
                if code < 0:  # killed by a signal: die of the same one
                    signal.signal(-code, signal.SIG_DFL)
                    os.kill(os.getpid(), -code)
                os._exit(code if code >= 0 else 1)


def _build_root(view: View) -> None:
    """A new root on a tmpfs: read-only binds, /proc, /dev, the writable tmpfs; then pivot."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in view.read_only if os.path.exists(p)}
    new = "/tmp"  # any directory: the tmpfs hides it (sources are held open above)
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{top}"):  # merged /usr: keep the links
            os.symlink(os.readlink(f"/{top}"), f"{new}/{top}")
    for path, fd in sources.items():
        _bind(f"/proc/self/fd/{fd}", new + path)
        os.close(fd)
    for path in view.hidden:  # only where a bound directory would show it
        if os.path.isdir(new + path) and any(path.startswith(b + "/") for b in view.read_only):
            _mount("tmpfs", new + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    os.makedirs(f"{new}/proc")
    _mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _make_dev(new, view.tmpfs_mb)
    for path in (WRITABLE, "/tmp"):  # /tmp stays empty and read-only
        os.makedirs(new + path, exist_ok=True)
    _mount("tmpfs", new + WRITABLE, "tmpfs", MS_NOSUID | MS_NODEV, f"size={view.tmpfs_mb}m,mode=1777")
    os.makedirs(f"{new}/.old")
    _check(
        _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT or -1), os.fsencode(new), os.fsencode(f"{new}/.old")),
        "pivot_root",
    )
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount2(old root)")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _bind(source: str, target: str) -> None:
    """Bind `source` read-only at `target` (a file or a directory)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(source).f_flag & _KEPT_FLAGS  # flags the kernel will not let us clear
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _make_dev(new: str, tmpfs_mb: int) -> None:
    os.makedirs(f"{new}/dev/shm")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{new}/dev/{name}", "a").close()
            _mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{new}/dev/{name}")
    _mount("tmpfs", f"{new}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")
