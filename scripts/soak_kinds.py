"""The server's RSS growth per request kind of the soak (docs/results/soak_rss.md): one
`conveyor serve` with the soak's tools, then for each kind a warm-up of a quarter of
`--requests` and a measured run of `--requests`, the server's RSS read before and after.

    PYTHONPATH=$PWD python scripts/soak_kinds.py --model /tmp/tiny \\
        --kinds chat,client_tool,server_tool:calculator,server_tool:fault [--serve-args "--no-share-cores"]

`server_tool:NAME` sends only server-tool requests for tool NAME. A tiny random model (e.g.
`tests/tiny.py`'s `build_tiny_model`) shows the growth in minutes.
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


def run(url: str, kind: str, count: int) -> None:
    """`count` requests of `kind` from 4 clients, as the soak sends them."""
    config = soak_load.LoadConfig(url, "soak", 4, count, 0.3, (8, 160), 0, 300.0, 6000, {kind: 1})
    load = soak_load.Load(config, soak_load.Outcomes())
    load.start()
    while not load.done:
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--kinds", default="chat,chat_nostream,client_tool,server_tool,bad")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--serve-args", default="")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--served-model-name", "soak", "--tools", *TOOLS, "--call-timeout-s", "5", "--num-workers", "2"]
    server = wait_healthy(spawn_server(cmd + shlex.split(args.serve_args)), url, "conveyor serve")
    process = psutil.Process(server.pid)
    try:
        for kind in args.kinds.split(","):
            kind, _, tool = kind.partition(":")
            soak_load.SERVER_TOOLS = (tool,) if tool else ("calculator", "python", "fault")
            run(url, kind, args.requests // 4)
            before, start = process.memory_info().rss, time.monotonic()
            run(url, kind, args.requests)
            growth_kb = (process.memory_info().rss - before) / 1024
            print(
                f"{kind}{':' + tool if tool else ''}: RSS {before / 2**20:.1f} MB, +{growth_kb / 1024:.1f} MB, "
                f"{growth_kb / args.requests:.1f} KB/request, {time.monotonic() - start:.0f} s",
                flush=True,
            )
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
