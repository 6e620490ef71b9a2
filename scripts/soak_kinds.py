"""The server's RSS growth per request kind of the soak (docs/results/soak_rss.md): one
`conveyor serve` with the soak's tools, then for each kind a warm-up of a quarter of
`--requests` and a measured run of `--requests`, the server's RSS read before and after.

    PYTHONPATH=$PWD python scripts/soak_kinds.py --model /tmp/tiny \\
        --kinds chat,client_tool,server_tool:calculator,server_tool:fault [--serve-args "--no-share-cores"]

`server_tool:NAME` sends only server-tool requests for tool NAME; a kind may repeat (a second
phase in the same server). `--faults KIND` serves the fault tool that always draws KIND
(`soak_tools.fault_only`). Besides RSS, each phase prints the growth of the server's private
anonymous memory, its heap and anonymous mappings (`/proc/PID/smaps`), threads and FDs. A tiny
random model (e.g. `tests/tiny.py`'s `build_tiny_model`) shows the growth in minutes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import psutil

from conveyor.bench import soak_load
from conveyor.bench.serve import free_port, spawn_server, stop_server, wait_healthy
from conveyor.bench.soak import TOOLS


def run(url: str, kind: str, count: int) -> soak_load.Outcomes:
    """`count` requests of `kind` from 4 clients, as the soak sends them; their outcomes."""
    config = soak_load.LoadConfig(url, "soak", 4, count, 0.3, (8, 160), 0, 300.0, 6000, {kind: 1})
    outcomes = soak_load.Outcomes()
    load = soak_load.Load(config, outcomes)
    load.start()
    while not load.done:
        time.sleep(0.2)
    return outcomes


def snapshot(process: psutil.Process) -> dict[str, float]:
    """The server's RSS, heap, other anonymous mappings (MB), threads and FDs."""
    heap = anon = 0
    for m in process.memory_maps(grouped=False):
        if m.path == "[heap]":
            heap += m.rss
        elif m.path in ("", "[anon]"):
            anon += m.rss
    return {
        "rss": process.memory_info().rss / 2**20,
        "heap": heap / 2**20,
        "anon": anon / 2**20,
        "threads": process.num_threads(),
        "fds": process.num_fds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--kinds", default="chat,chat_nostream,client_tool,server_tool,bad")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--serve-args", default="")
    parser.add_argument("--faults", default="", help="one fault kind for every fault call (default: the mix)")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--model", args.model, "--port", str(port)]
    tools = [f"{t}_only.{args.faults}" if args.faults and t.endswith(":fault") else t for t in TOOLS]
    cmd += ["--served-model-name", "soak", "--tools", *tools, "--call-timeout-s", "5", "--num-workers", "2"]
    server = wait_healthy(spawn_server(cmd + shlex.split(args.serve_args)), url, "conveyor serve")
    process = psutil.Process(server.pid)
    try:
        for kind in args.kinds.split(","):
            kind, _, tool = kind.partition(":")
            soak_load.SERVER_TOOLS = (tool,) if tool else ("calculator", "python", "fault")
            run(url, kind, args.requests // 4)
            before, start = snapshot(process), time.monotonic()
            outcomes = run(url, kind, args.requests).report()
            after = snapshot(process)
            growth = {k: after[k] - before[k] for k in after}
            print(
                f"{kind}{':' + tool if tool else ''}: RSS {before['rss']:.1f} MB, +{growth['rss']:.1f} MB, "
                f"{growth['rss'] * 1024 / args.requests:.1f} KB/request (heap {growth['heap']:+.1f}, "
                f"anon {growth['anon']:+.1f} MB; threads {after['threads']} ({growth['threads']:+d}), "
                f"fds {after['fds']} ({growth['fds']:+d})), {time.monotonic() - start:.0f} s",
                flush=True,
            )
            print(f"  finish reasons {outcomes['finish_reasons']}, tool results {outcomes['tool_results']}")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
