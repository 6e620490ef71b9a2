"""Imported by the tool workers' forkserver only (the first module it preloads), never by the
server: it wipes the secrets the forkserver inherited, so that no worker forked from it holds
them, not even in memory (tool code can read its own memory through ctypes).

The forkserver was exec'd with the server's environment (CONVEYOR_API_KEY and the like).
Every variable but a few the interpreter and its libraries need is overwritten in place (the
bytes objects behind os.environ) and removed; the kept ones are set again, which copies them
to the heap, and then the process's original environment block (what /proc/self/environ
shows) is zeroed.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEPT = ("PATH", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_BYTES_DATA = sys.getsizeof(b"") - 1  # offset of a bytes object's buffer


def _zero(value: bytes) -> None:
    if len(value) > 1:  # 0- and 1-byte bytes objects are shared singletons
        ctypes.memset(id(value) + _BYTES_DATA, 0, len(value))


def scrub() -> None:
    kept = {k: os.environ[k] for k in KEPT if k in os.environ}
    for key in list(os.environb):
        value = os.environb[key]
        del os.environb[key]
        _zero(value)
    for key, value in kept.items():
        os.environ[key] = value
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)
    if 0 < env_start < env_end:
        ctypes.memset(env_start, 0, env_end - env_start)


scrub()
