"""llama.cpp's server (the xllamacpp wheel) with SmolLM2-135M (or another GGUF) on a free
loopback port, in a child process; ready once /health answers 200 (polled against a deadline).

By hand, for `--backend` runs: `python -m tests.backends.llamacpp [MODEL.gguf] [THREADS]`
prints the URL and serves until interrupted."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conveyor.bench import llamacpp_peer


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
    """Yields the server's base URL (2 slots of 2,048 tokens); the child process is stopped on exit."""
    with llamacpp_peer.llama_server(
        model or smollm2_gguf(), num_threads, 2, ctx_per_slot=2048, deadline_s=deadline_s
    ) as (url, _pid):
        yield url


if __name__ == "__main__":
    with llama_server(
        Path(sys.argv[1]) if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 1
    ) as base_url:
        print(base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
