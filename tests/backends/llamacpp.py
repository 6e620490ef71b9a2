"""llama.cpp's server (the xllamacpp wheel) with SmolLM2-135M (or another GGUF) on a free
loopback port, in a child process; ready once /health answers 200 (polled against a deadline).

By hand, for `--backend` runs: `python -m tests.backends.llamacpp [MODEL.gguf] [THREADS]`
prints the URL and serves until interrupted."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

_MAIN = """
import sys, threading, xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]
p.port = 0
p.n_parallel = 2
p.n_ctx = 4096
p.cpuparams.n_threads = int(sys.argv[2])
p.cpuparams_batch.n_threads = int(sys.argv[2])
p.endpoint_metrics = True
p.endpoint_slots = True
p.warmup = False
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
sys.stdin.read()            # until the parent closes our stdin
"""


def smollm2_gguf() -> Path:
    """The test model's GGUF, installed and sha256-verified by the model loader."""
    from conveyor.engine.model.loader import BUILTIN_MODELS, _hash_files, _install

    model = BUILTIN_MODELS["smollm2-135m"]
    [path] = _install(model.parts, progress=False)
    if _hash_files([path], None, False) != model.sha256:
        raise RuntimeError(f"{path} does not match the sha256 of smollm2-135m")
    return path


@contextmanager
def llama_server(model: Path | None = None, num_threads: int = 1, deadline_s: float = 120.0) -> Iterator[str]:
    """Yields the server's base URL; the child process is stopped on exit."""
    args = [str(model or smollm2_gguf()), str(num_threads)]
    child = subprocess.Popen([sys.executable, "-c", _MAIN, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = _address(child)
        _wait_healthy(url, time.monotonic() + deadline_s)
        yield url
    finally:
        child.stdin.close()
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _address(child: subprocess.Popen) -> str:
    for line in child.stdout:           # the model loads before the address is printed
        if line.startswith("listening "):
            return line.split()[1]
    raise RuntimeError(f"llama.cpp server exited with {child.wait()} before listening")


def _wait_healthy(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)     # polling a readiness endpoint, not waiting for an event we could observe
    raise RuntimeError(f"llama.cpp server at {url} not healthy in time")


if __name__ == "__main__":
    with llama_server(Path(sys.argv[1]) if len(sys.argv) > 1 else None,
                      int(sys.argv[2]) if len(sys.argv) > 2 else 1) as base_url:
        print(base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
