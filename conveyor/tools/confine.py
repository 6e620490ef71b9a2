"""The last locks a tool worker puts on itself: no capabilities, no new privileges, a seccomp
filter against the obvious escapes, and Landlock (where the kernel has it) on file writes.

The seccomp filter (a small classic-BPF program, installed with prctl) returns EPERM for
system calls tool code has no use for and that open a way out or into the kernel: ptrace and
process_vm_*, mounting and namespaces (unshare, setns, clone with a CLONE_NEW* flag; clone3
gets ENOSYS so that libc falls back to clone, whose flags the filter can see), kernel modules,
kexec, bpf, perf_event_open, userfaultfd, keyrings, io_uring, file handles, POSIX message
queues (they would outlive a call in the IPC namespace a worker keeps), the clock and
reboot. A call from another ABI (x32, or 32-bit int 0x80) kills the process. x86-64 only:
elsewhere `install_seccomp` raises OSError and the worker reports seccomp as missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _SECCOMP_MODE_FILTER = 38, 22, 24, 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_CLONE, _CLONE3 = 56, 435
_NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_DENIED = {  # x86-64 numbers
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "personality": 135,
    "ustat": 136,
    "sysfs": 139,
    "vhangup": 153,
    "pivot_root": 155,
    "_sysctl": 156,
    "adjtimex": 159,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "create_module": 174,
    "init_module": 175,
    "delete_module": 176,
    "get_kernel_syms": 177,
    "query_module": 178,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "mq_open": 240,
    "mq_unlink": 241,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


class _Insn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _Prog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn)))


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, *values: int | ctypes.c_void_p) -> int:
    args = [v if isinstance(v, ctypes.c_void_p) else ctypes.c_ulong(v) for v in values]
    return _libc.prctl(ctypes.c_int(option), *args, *[ctypes.c_ulong(0)] * (4 - len(args)))


def no_new_privs() -> None:
    """execve can never grant privileges again (setuid binaries, file capabilities)."""
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_capabilities() -> None:
    """No capabilities (not even in the worker's own user namespace), none to regain."""
    for cap in range(64):
        with contextlib.suppress(OSError):
            _check(_prctl(_PR_CAPBSET_DROP, cap), "prctl(PR_CAPBSET_DROP)")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions (see the module docstring)."""
    denied = sorted(_DENIED.values())
    n = len(denied)
    # layout: 0 arch, 1 jeq, 2 nr, 3 x32, 4 clone3, 5 clone, 6.. denied, then ALLOW, EPERM,
    # ENOSYS, KILL, and clone's check: load its flags, jset, EPERM, ALLOW (jumps go forward only)
    allow, eperm = 6 + n, 7 + n
    enosys, kill, clone_check = 8 + n, 9 + n, 10 + n
    prog = [
        (_LD_W_ABS, 0, 0, 4),
        (_JEQ, 0, kill - 2, _AUDIT_ARCH_X86_64),
        (_LD_W_ABS, 0, 0, 0),
        (_JGE, eperm - 4, 0, _X32_BIT),
        (_JEQ, enosys - 5, 0, _CLONE3),
        (_JEQ, clone_check - 6, 0, _CLONE),
    ]
    prog += [(_JEQ, eperm - (7 + i), 0, nr) for i, nr in enumerate(denied)]
    assert len(prog) == allow
    prog += [
        (_RET, 0, 0, _ALLOW),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        (_RET, 0, 0, _ERRNO | errno.ENOSYS),
        (_RET, 0, 0, _KILL),
        (_LD_W_ABS, 0, 0, 16),
        (_JSET, 0, 1, _NAMESPACE_FLAGS),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        (_RET, 0, 0, _ALLOW),
    ]
    return prog


def install_seccomp() -> None:
    """Install the filter for this (single-threaded) process and all it starts; needs no_new_privs."""
    if os.uname().machine != "x86_64":
        raise OSError(errno.ENOSYS, f"no seccomp filter for {os.uname().machine} (x86-64 only)")
    prog = seccomp_program()
    insns = (_Insn * len(prog))(*(_Insn(*i) for i in prog))
    fprog = _Prog(len(prog), ctypes.cast(insns, ctypes.POINTER(_Insn)))
    _check(
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.c_void_p(ctypes.addressof(fprog))),
        "prctl(PR_SET_SECCOMP)",
    )


# ---- Landlock ---------------------------------------------------------------------------------
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446  # same on x86-64 and arm64
_WRITE_FILE, _REFER, _TRUNCATE = 1 << 1, 1 << 13, 1 << 14
_MAKE_AND_REMOVE = sum(1 << bit for bit in range(4, 13))  # remove dir/file, make char..sym (ABI 1)
# ABI 6: no signals, and no connecting to abstract unix sockets, out of the sandbox
_SCOPES = (1 << 0) | (1 << 1)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _syscall(number: int, *args: object) -> int:
    return _libc.syscall(ctypes.c_long(number), *args)


def landlock(writable: tuple[str, ...]) -> int:
    """Allow file writes only beneath `writable` and to /dev/null; returns the ABI enforced, or
    0 where the kernel has no Landlock. Needs no_new_privs (or CAP_SYS_ADMIN)."""
    abi = _syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    if abi <= 0:
        return 0
    rights = _WRITE_FILE | _MAKE_AND_REMOVE | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(rights, 0, _SCOPES if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else 8
    ruleset = _check(
        _syscall(_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for path in writable:
            with contextlib.suppress(FileNotFoundError):
                _allow(ruleset, path, rights)
        with contextlib.suppress(FileNotFoundError):
            _allow(ruleset, "/dev/null", rights & (_WRITE_FILE | _TRUNCATE))
        _check(
            _syscall(_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self"
        )
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, allowed: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(allowed, fd)
        _check(
            _syscall(
                _LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(1),  # PATH_BENEATH
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)
