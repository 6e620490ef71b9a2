"""The zygote's guard: `kill(-1)` only from a process provably alone in a PID namespace of its
own. These tests run in the test process (the host's or the server's PID namespace), so the
signal is always replaced by a recorder: a real kill(-1) here would kill every process of the
machine. reset() itself runs only inside real sandboxed workers (tests/unit/test_workers.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conveyor.tools import zygote


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """What `_kill_others` would signal, and recorders for what reset() would wipe."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(zygote, "_kill", lambda pid, sig: calls.append((pid, sig)))
    monkeypatch.setattr(zygote, "_others", list)
    monkeypatch.setattr(zygote, "_empty", lambda directory: pytest.fail(f"emptied {directory}"))
    monkeypatch.setattr(zygote, "_remove_sysv_ipc", lambda: pytest.fail("removed SysV IPC"))
    return calls


def test_the_server_is_not_confined() -> None:
    outer = zygote.outer_pid_namespaces()
    assert zygote.own_pid_namespace() in outer
    assert zygote.confined(outer) == "it is in the server's or the host's PID namespace"
    assert zygote.confined(()) == "the server's PID namespace is unknown"


@pytest.mark.parametrize("outer", [(), "ours"])
def test_reset_outside_a_pid_namespace_of_its_own_signals_and_wipes_nothing(
    sent: list[tuple[int, int]], tmp_path: Path, outer: Any
) -> None:
    (tmp_path / "kept").write_text("x")
    assert not zygote.reset(str(tmp_path), zygote.outer_pid_namespaces() if outer == "ours" else outer)
    assert sent == []
    assert (tmp_path / "kept").read_text() == "x"


def test_a_namespace_of_its_own_is_not_enough(
    sent: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = (zygote.own_pid_namespace() + 1,)  # as if the server were elsewhere
    if os.getppid() != 1:
        assert zygote.confined(other) == "its parent is not its PID namespace's init"
    monkeypatch.setattr(os, "getppid", lambda: 1)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    assert zygote.confined(other) == "it is its PID namespace's init"
    with pytest.raises(zygote.Unconfined):
        zygote._kill_others(other)
    assert sent == []


def test_a_confined_process_signals_every_other_one(
    sent: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = (zygote.own_pid_namespace() + 1,)
    monkeypatch.setattr(os, "getppid", lambda: 1)
    monkeypatch.setattr(os, "getpid", lambda: 2)
    assert zygote.confined(other) == ""
    zygote._kill_others(other)
    assert sent == [(-1, signal.SIGKILL)]
