"""What the hostile python call of `test_hostile_code_http.py` runs inside its tool worker
(imported there, so that the scripted call fits the tiny model's context)."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
from collections.abc import Callable


def _attempt(action: Callable[[], object]) -> str:
    try:
        return repr(action())[:80]
    except Exception as e:  # noqa: BLE001 - the probe reports any refusal
        return "refused " + type(e).__name__


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _request(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        return s.send(b"GET /v1/models HTTP/1.0\r\n\r\n")


def run(secret: str, port: int, outside: str) -> None:
    """Print one line per escape: whether the secret was seen, or what the attempt gave."""
    print("environ", secret in repr(dict(os.environ)))
    print("proc", any(secret in _read(p) for p in glob.glob("/proc/*/environ")))
    print("cmdline", any(secret in _read(p) for p in glob.glob("/proc/*/cmdline")))
    print("loopback", _attempt(lambda: _request(port)))
    print("forkserver", glob.glob(tempfile.gettempdir() + "/pymp-*"), glob.glob("/tmp/pymp-*"))
    print("shadow", _attempt(lambda: _read_strict("/etc/shadow")))
    print("write", _attempt(lambda: _write(outside)))


def _read_strict(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str) -> int:
    with open(path, "w") as f:
        return f.write("x")
