"""What the soak watches in the server: its process (RSS, open file descriptors, threads), its
descendants (tool workers, the forkserver; every one seen is remembered so that survivors can
be found after the server stops) and its `/metrics` (every `conveyor_*` gauge and counter, so
worker counters added later are picked up without changes here).

The soak makes itself a child subreaper (Linux `PR_SET_CHILD_SUBREAPER`): a descendant of the
server that outlives it is re-parented to the soak instead of init, so `orphans()` finds it
even if it was started and detached between two samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

PR_SET_CHILD_SUBREAPER = 36
KV_USED = "conveyor_kv_blocks_used"
RUNNING = "conveyor_requests_running"
AWAITING = "conveyor_requests_awaiting_tools"


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def parse_metrics(text: str) -> dict[str, float]:
    """`name{label="v",...}` -> value for every conveyor_* sample but histogram buckets and
    `_created` timestamps."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("conveyor_") or s.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def matching(metrics: dict[str, float], word: str) -> dict[str, float]:
    """The metrics whose name contains `word` (e.g. "busy", "restart", "refus")."""
    return {k: v for k, v in metrics.items() if word in k.split("{", 1)[0]}


@dataclass(slots=True)
class ServerProbe:
    """Samples one server process and its descendants, and reads its /metrics."""

    pid: int
    url: str
    process: psutil.Process = field(init=False)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time, every descendant seen
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10.0))
    ours_before: set[int] = field(default_factory=set)  # this process's other children (not the server's)

    def __post_init__(self) -> None:
        self.process = psutil.Process(self.pid)
        self.ours_before = {p.pid for p in psutil.Process().children(recursive=True)} - {self.pid}

    def metrics(self) -> dict[str, float]:
        """The server's metrics now; {} when /metrics did not answer 200."""
        try:
            r = self.http.get(self.url + "/metrics")
        except httpx.HTTPError:
            return {}
        return parse_metrics(r.text) if r.status_code == 200 else {}

    def healthy(self) -> bool:
        try:
            return self.http.get(self.url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def sample(self, start: float) -> dict[str, Any]:
        """One row of the time series (plain data)."""
        with self.process.oneshot():
            rss, fds, threads = (
                self.process.memory_info().rss,
                self.process.num_fds(),
                self.process.num_threads(),
            )
        children_rss, children = 0, self._descendants()
        for child in children:
            with contextlib.suppress(psutil.Error):
                children_rss += child.memory_info().rss
        m = self.metrics()
        return {
            "t_s": round(time.monotonic() - start, 2),
            "rss_mb": round(rss / 2**20, 1),
            "num_fds": fds,
            "num_threads": threads,
            "num_descendants": len(children),
            "descendants_rss_mb": round(children_rss / 2**20, 1),
            "kv_blocks_used": m.get(KV_USED),
            "requests_running": m.get(RUNNING),
            "requests_awaiting_tools": m.get(AWAITING),
            "busy_workers": _sum(matching(m, "busy")),
            "worker_restarts": _sum(matching(m, "restart")),
        }

    def _descendants(self) -> list[psutil.Process]:
        try:
            children = self.process.children(recursive=True)
        except psutil.Error:
            return []
        for child in children:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(child.pid, child.create_time())
        return children

    def orphans(self) -> list[dict[str, Any]]:
        """Processes still alive after the server exited: descendants seen while it ran, and
        children re-parented to this (subreaper) process. Zombies are reaped, not counted."""
        found: dict[int, psutil.Process] = {}
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created:
                    found[pid] = p
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process().children(recursive=True):
                if p.pid not in self.ours_before and p.create_time() >= self.process.create_time():
                    found.setdefault(p.pid, p)
        return [row for p in found.values() if (row := _alive(p)) is not None]

    def close(self) -> None:
        self.http.close()


def _alive(p: psutil.Process) -> dict[str, Any] | None:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            _reap(p.pid)
            return None
        return {"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]}
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_orphans(orphans: list[dict[str, Any]]) -> None:
    """SIGKILL the orphans found (by pid, after the report has recorded them) and reap ours."""
    for row in orphans:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(row["pid"])
            p.kill()
            with contextlib.suppress(psutil.TimeoutExpired):
                p.wait(5)
        _reap(row["pid"])


def _sum(values: dict[str, float]) -> float | None:
    """The sum of the matched metrics; None when the server offers none (an older server)."""
    return sum(values.values()) if values else None
