"""llama.cpp as a peer in `conveyor bench engine`: its server (the xllamacpp wheel) on the same
GGUF file, in a child process on a free loopback port, fed the same chat prompts, greedy, with
the same number of new tokens (``ignore_eos``), the same threads.

Decode speed is counted as Conveyor's is: the tokens after each request's first one, over the
time after every request of the round has its first token (streamed, one token per event).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

_MAIN = """
import sys, xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]
p.port = 0
p.n_parallel = int(sys.argv[3])
p.n_ctx = int(sys.argv[4]) * int(sys.argv[3])
p.cpuparams.n_threads = int(sys.argv[2])
p.cpuparams_batch.n_threads = int(sys.argv[2])
p.endpoint_metrics = True
p.endpoint_slots = True
p.warmup = False
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
sys.stdin.read()            # until the parent closes our stdin
"""


@contextmanager
def llama_server(
    gguf: Path, num_threads: int, num_parallel: int, ctx_per_slot: int = 1024, deadline_s: float = 180.0
) -> Iterator[tuple[str, int]]:
    """Yields (base URL, child pid); the child is stopped on exit. Also the llama.cpp server of
    the remote-backend tests (`tests/backends/llamacpp.py`)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _MAIN, str(gguf), str(num_threads), str(num_parallel), str(ctx_per_slot)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = next((line.split()[1] for line in child.stdout if line.startswith("listening ")), None)
        if url is None:
            raise RuntimeError(f"llama.cpp server exited with {child.wait()} before listening")
        deadline = time.monotonic() + deadline_s
        while not _healthy(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server at {url} not healthy in time")
            time.sleep(0.1)  # polling its readiness endpoint: there is no event to wait on
        yield url, child.pid
    finally:
        child.stdin.close()
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stream(url: str, messages: list[dict], new_tokens: int, stamps: list[float]) -> None:
    body = {
        "messages": messages,
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "cache_prompt": False,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600.0) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())


def llamacpp_decode(url: str, prompts: list[list[dict]], new_tokens: int) -> float:
    """Decode tok/s of one round of ``prompts`` sent at once."""
    stamps: list[list[float]] = [[] for _ in prompts]
    threads = [
        threading.Thread(target=_stream, args=(url, p, new_tokens, s)) for p, s in zip(prompts, stamps)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(stamps):
        raise RuntimeError("llama.cpp returned no tokens for a request")
    start = max(s[0] for s in stamps)
    after = sum(1 for s in stamps for t in s if t > start)
    return after / (max(s[-1] for s in stamps) - start)
