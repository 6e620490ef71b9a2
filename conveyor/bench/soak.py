"""`conveyor bench soak`: a bounded soak of `conveyor serve` with mixed tool workloads, random
aborts and injected tool faults, judged by leak verdicts.

The server runs as a subprocess on loopback (a free port) with the calculator, python and
fault tools (`bench/soak_tools.py`); `bench/soak_load.py`'s clients send the mix until
`--duration-s` or `--max-requests`. Every `--sample-s` `bench/soak_probe.py` records the
server's RSS, open file descriptors, descendants and `/metrics`. When the clients have
stopped, the soak waits for the server to go idle, takes the last sample, stops the server
with SIGTERM (its own cleanup, not a group kill) and looks for processes that survived it.
`bench/soak_report.py` turns all that into verdicts, the JSON, the table and the plot; the
command exits non-zero when a verdict fails.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.bench import soak_report
from conveyor.bench.serve import free_port, spawn_server, stderr_tail, stop_server, wait_healthy
from conveyor.bench.soak_load import MIX, Load, LoadConfig, Outcomes, parse_mix
from conveyor.bench.soak_probe import ServerProbe, become_subreaper, kill_orphans

TOOLS = ("calculator", "python", "conveyor.bench.soak_tools:fault")
STOP_S = 60.0
ORPHAN_GRACE_S = 5.0  # e.g. multiprocessing's resource tracker exits once it sees its last user gone


def add_soak_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        default="docs/results/soak.json",
        help="where to write the results (the .md table and the .png plot beside it)",
    )
    parser.add_argument("--model", default="smollm2-135m", help="model to serve")
    parser.add_argument("--duration-s", type=float, default=1200.0, help="seconds of load")
    parser.add_argument(
        "--max-requests", type=int, default=0, help="most requests sent (0: only --duration-s bounds)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="client threads, one request in flight each"
    )
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples of the server")
    parser.add_argument(
        "--abort-share", type=float, default=0.3, help="share of streamed requests closed early"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        nargs=2,
        default=[8, 160],
        metavar=("LOW", "HIGH"),
        help="range of each request's random max_tokens",
    )
    parser.add_argument(
        "--mix",
        default="",
        help="request kinds and weights, e.g. chat=1,server_tool=3 "
        f"(kinds: {', '.join(MIX)}); empty: {','.join(f'{k}={v}' for k, v in MIX.items())}",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    parser.add_argument("--request-timeout-s", type=float, default=300.0, help="clients' read timeout")
    parser.add_argument(
        "--long-prompt-words",
        type=int,
        default=6000,
        help="words of the invalid too-long prompt (past the model's context)",
    )
    parser.add_argument(
        "--call-timeout-s",
        type=float,
        default=5.0,
        help="the server's tool call timeout (the fault tool's hangs end there)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="the server's tool workers")
    parser.add_argument("--serve-args", default="", help="more `conveyor serve` flags, one quoted string")
    parser.add_argument(
        "--start-timeout-s", type=float, default=900.0, help="longest wait for the server to load"
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=60.0,
        help="longest wait, after the clients stopped, for 0 running requests and 0 used blocks",
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=64.0,
        help="bound on the server's RSS growth, median of the last quarter minus the first",
    )
    parser.add_argument(
        "--max-fd-growth",
        type=float,
        default=8.0,
        help="bound on the growth of the server's open file descriptors (same quarters)",
    )


def _validate(args: argparse.Namespace) -> None:
    low, high = args.max_tokens
    checks = [
        (args.duration_s > 0, "--duration-s must be positive"),
        (args.concurrency > 0, "--concurrency must be positive"),
        (args.sample_s > 0, "--sample-s must be positive"),
        (0 <= args.abort_share <= 1, "--abort-share must be in [0, 1]"),
        (1 <= low <= high, "--max-tokens needs 1 <= LOW <= HIGH"),
        (args.max_requests >= 0, "--max-requests must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    parse_mix(args.mix)


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "conveyor.cli",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--served-model-name",
        "soak",
        "--tools",
        *TOOLS,
        "--call-timeout-s",
        str(args.call_timeout_s),
        "--num-workers",
        str(args.num_workers),
        *shlex.split(args.serve_args),
    ]


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and write its results; returns them (`result["pass"]`: every verdict held)."""
    _validate(args)
    subreaper = become_subreaper()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(args, port)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    server = wait_healthy(spawn_server(cmd), url, "conveyor serve", args.start_timeout_s)
    probe = ServerProbe(server.pid, url)
    try:
        start = time.monotonic()
        run = _load_and_watch(args, probe, server, url, start)
        alive = server.poll() is None
        run["end"] = _settle(args, probe, start) if alive else end_of_dead_server(run["samples"][-1])
    finally:
        run_stop = _stop_and_find_orphans(server, probe)
        probe.close()
    result = soak_report.build(
        args, {**run, **run_stop, "subreaper": subreaper, "started_at": started_at, "server_command": cmd}
    )
    if not result["pass"]:
        result["server_log_tail"] = run_stop["log_tail"]
    soak_report.write(Path(args.json), result)
    return result


def _load_and_watch(
    args: argparse.Namespace, probe: ServerProbe, server: subprocess.Popen, url: str, start: float
) -> dict[str, Any]:
    outcomes = Outcomes()
    config = LoadConfig(
        url,
        "soak",
        args.concurrency,
        args.max_requests,
        args.abort_share,
        tuple(args.max_tokens),
        args.seed,
        args.request_timeout_s,
        args.long_prompt_words,
        parse_mix(args.mix),
    )
    load = Load(config, outcomes)
    samples = [probe.sample(start)]
    load.start()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ) as progress:
        task = progress.add_task("soak", total=args.duration_s, status="")
        samples += _watch(
            args,
            probe,
            server,
            load,
            start,
            lambda s: progress.update(
                task, completed=min(s["t_s"], args.duration_s), status=_status(s, outcomes)
            ),
        )
        progress.update(task, description="stopping clients", status=_status(samples[-1], outcomes))
        clients_stopped = load.stop(args.request_timeout_s + 30)
    return {
        "samples": samples,
        "load_s": round(time.monotonic() - start, 1),
        "num_sent": load.num_sent,
        "clients_stopped": clients_stopped,
        "outcomes": outcomes.report(),
        "server_alive": server.poll() is None,
    }


def _watch(
    args: argparse.Namespace,
    probe: ServerProbe,
    server: subprocess.Popen,
    load: Load,
    start: float,
    on_sample: Any,
) -> list[dict[str, Any]]:
    """Samples every sample_s until the duration is over, the clients are done or the server died."""
    samples, tick = [], threading.Event()  # never set: its wait paces the samples
    while time.monotonic() - start < args.duration_s and not load.done and server.poll() is None:
        tick.wait(min(args.sample_s, max(0.0, start + args.duration_s - time.monotonic())))
        if server.poll() is not None:
            break
        samples.append(probe.sample(start))
        on_sample(samples[-1])
    return samples


def _status(sample: dict[str, Any], outcomes: Outcomes) -> str:
    snap = outcomes.snapshot()
    counts = " ".join(f"{k} {v}" for k, v in snap.items())
    return (
        f"rss {sample['rss_mb']:.0f} MB, fds {sample['num_fds']}, blocks {sample['kv_blocks_used']}, {counts}"
    )


def _settle(args: argparse.Namespace, probe: ServerProbe, start: float) -> dict[str, Any]:
    """After the clients: wait (bounded) until the server is idle, then its last sample and metrics."""
    deadline, tick, idle = time.monotonic() + args.idle_timeout_s, threading.Event(), False
    waited_from = time.monotonic()
    while time.monotonic() < deadline:
        m = probe.metrics()
        if m and soak_report.is_idle(m):
            idle = True
            break
        tick.wait(0.25)  # polling a subprocess's metrics, bounded by the deadline
    return {
        "idle": idle,
        "idle_after_s": round(time.monotonic() - waited_from, 2),
        "sample": probe.sample(start),
        "metrics": probe.metrics(),
        "healthy": probe.healthy(),
    }


def end_of_dead_server(last: dict[str, Any]) -> dict[str, Any]:
    """The end record of a server that died during the load: its last sample stands in."""
    return {"idle": False, "idle_after_s": None, "sample": last, "metrics": {}, "healthy": False}


def _survivors(probe: ServerProbe) -> list[dict[str, Any]]:
    """The server's descendants still alive ORPHAN_GRACE_S after it exited (bounded polling)."""
    deadline, tick = time.monotonic() + ORPHAN_GRACE_S, threading.Event()
    while (orphans := probe.orphans()) and time.monotonic() < deadline:
        tick.wait(0.1)
    return orphans


def _stop_and_find_orphans(server: subprocess.Popen, probe: ServerProbe) -> dict[str, Any]:
    """SIGTERM to the server alone; the processes that outlive it are orphans (killed after
    being recorded), then the group is cleaned up as the serve bench does."""
    stopped_at = time.monotonic()
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        exit_code: int | None = server.wait(STOP_S)
    except subprocess.TimeoutExpired:
        exit_code = None
    stop_s = round(time.monotonic() - stopped_at, 2)
    orphans = _survivors(probe)
    kill_orphans(orphans)
    server.stderr.seek(0)
    num_tracebacks = server.stderr.read().count(b"Traceback (most recent call last)")
    log_tail = stderr_tail(server, 4000)
    stop_server(server)
    return {
        "exit_code": exit_code,
        "stop_s": stop_s,
        "stop_limit_s": STOP_S,
        "orphans": orphans,
        "log_tail": log_tail,
        "server_log_tracebacks": num_tracebacks,
    }
