"""Memory and process-count limits for a tool worker and everything it starts, by cgroup.

Each worker (as root, before it drops privileges) makes `conveyor-tools/w<pid>` below its own
cgroup of the v1 `memory` and `pids` hierarchies, or of the v2 unified hierarchy where that is
mounted at /sys/fs/cgroup, writes its limits and moves itself in; its children inherit it, so
the limits cover them together (shared memory and tmpfs pages included). The pool removes the
directory once the worker is gone (`remove`), and at start removes those of workers no longer
alive (`sweep`: a SIGKILLed server leaves them behind).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "conveyor-tools"


def _own(controller: str) -> Path | None:
    """This process's cgroup directory in `controller`'s hierarchy ("" = the v2 one), if mounted."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(",") or (controller == "" and names == ""):
                base = ROOT / controller if controller else ROOT
                if controller == "" and not (base / "cgroup.controllers").exists():
                    return None  # a v1 host: its empty line names no usable hierarchy
                return base / path.lstrip("/")
    return None


def _dirs(pid: int) -> dict[str, Path]:
    """Where worker `pid`'s cgroups go, per hierarchy: "memory" and "pids" (v1) or "" (v2)."""
    found = {c: d for c in ("memory", "pids") if (d := _own(c)) is not None and (ROOT / c).is_dir()}
    if not found and (v2 := _own("")) is not None:
        found = {"": v2}
    return {c: d / GROUP / f"w{pid}" for c, d in found.items()}


def join(memory_mb: int, max_processes: int) -> list[str]:
    """Put this process into new cgroups with the limits; returns the limits applied (OSError if
    none could be: not root, or no hierarchy writable)."""
    applied = []
    for controller, group in _dirs(os.getpid()).items():
        with contextlib.suppress(OSError):
            group.mkdir(parents=True, exist_ok=True)
            if controller in ("memory", ""):
                name = "memory.limit_in_bytes" if controller else "memory.max"
                (group / name).write_text(str(memory_mb << 20))
                with contextlib.suppress(OSError):  # no swap beyond the limit either
                    (group / ("memory.memsw.limit_in_bytes" if controller else "memory.swap.max")).write_text(
                        str(memory_mb << 20) if controller else "0"
                    )
                applied.append(f"cgroup memory {memory_mb} MiB")
            if controller in ("pids", ""):
                (group / "pids.max").write_text(str(max_processes))
                applied.append(f"cgroup pids {max_processes}")
            (group / "cgroup.procs").write_text(str(os.getpid()))
    if not applied:
        raise OSError("no writable memory or pids cgroup (needs root and cgroup v1 memory/pids or v2)")
    return applied


def remove(pid: int) -> None:
    """Remove worker `pid`'s cgroups (it and its children are gone)."""
    for group in _dirs(pid).values():
        with contextlib.suppress(OSError):
            group.rmdir()


def sweep() -> None:
    """Remove the cgroups of workers that are no longer alive."""
    for base in {d.parent for d in _dirs(0).values()}:
        with contextlib.suppress(OSError):
            for group in base.iterdir():
                pid = group.name[1:]
                if group.name.startswith("w") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    remove(int(pid))
