"""Paced mode through the remote backend: a stand-in remote engine that streams recorded turns.

`conveyor bench workloads --mode paced --paced-remote` runs the recorded outputs through
`RemoteEngine` (HTTP streaming, continuation prompts, the remote tool rounds) instead of the
embedded engine, on the same emulated decode clock, so the two paths can be compared without the
noise of live decoding. The stand-in runs in a process of its own, as a remote engine would, and
speaks the streamed `/v1/completions` of the OpenAI API. Each request names the token ids to
stream in its `replay` field (the bench's per-turn constraint); the first comes after
`token_latency_ms` plus `prefill_ms_per_token` for each prompt token its prefix cache (the
longest shared prefix with an earlier prompt) does not hold, the others every `token_latency_ms`.
A stop token ends the turn ("stop"), `max_tokens` ("length"); a client that goes away stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from conveyor.bench.service import SseWriter, serve_until_stopped, start_service
from conveyor.bench.workloads.paced import Pace
from conveyor.engine.detokenizer import Detokenizer

MODEL_NAME = "paced-replay"
START_S = 120.0
MAX_CACHED_PROMPTS = 32


def start_paced_engine(
    model_dir: Path, pace: Pace, stop_token_ids: list[int]
) -> tuple[str, Callable[[], None]]:
    """Start the stand-in in a child process; returns its URL and a function that stops it."""
    return start_service(_serve, (str(model_dir), pace, stop_token_ids), "the paced stand-in engine", START_S)


def _serve(conn: Connection, model_dir: str, pace: Pace, stop_token_ids: list[int]) -> None:
    from transformers import AutoTokenizer

    engine = _PacedEngine(AutoTokenizer.from_pretrained(model_dir), pace, set(stop_token_ids))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(engine))
    server.daemon_threads = True
    serve_until_stopped(conn, server, f"http://127.0.0.1:{server.server_address[1]}")


class _PacedEngine:
    """The clock, the prefix cache and the detokenizer of the stand-in."""

    def __init__(self, tokenizer: Any, pace: Pace, stop_token_ids: set[int]) -> None:
        self.tokenizer, self.pace, self.stop_token_ids = tokenizer, pace, stop_token_ids
        self._prompts: list[list[int]] = []
        self._lock = threading.Lock()

    def admit(self, prompt: str) -> tuple[int, int]:
        """Prompt tokens and how many of them the emulated prefix cache holds."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        with self._lock:
            cached = max(
                (len(os.path.commonprefix([ids, p])) for p in self._prompts), default=0
            )  # any sequences
            self._prompts = [ids, *self._prompts][:MAX_CACHED_PROMPTS]
        return len(ids), min(cached, len(ids) - 1)  # the last prompt token is always computed

    def turn(self, body: dict[str, Any]) -> tuple[list[tuple[float, str]], str, dict[str, Any]]:
        """The deltas of one turn, each with its due time, its finish reason and its usage."""
        num_prompt, cached = self.admit(body["prompt"])
        replay, max_tokens = list(body.get("replay") or []), int(body.get("max_tokens") or 16)
        due = (
            time.perf_counter()
            + (self.pace.token_latency_ms + self.pace.prefill_ms_per_token * (num_prompt - cached)) / 1000
        )
        detokenizer, deltas = Detokenizer(self.tokenizer, []), []
        for token in replay[:max_tokens]:
            if token in self.stop_token_ids:
                finish = "stop"
                break
            deltas.append((due, detokenizer.push(token)))
            due += self.pace.token_latency_ms / 1000
        else:
            finish = "length" if len(replay) >= max_tokens else "stop"
        if deltas and (tail := detokenizer.flush()):  # an incomplete character
            deltas.append((deltas[-1][0], tail))
        usage = {
            "prompt_tokens": num_prompt,
            "completion_tokens": len(detokenizer.ids),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        return deltas, finish, usage


def _handler(engine: _PacedEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(SseWriter, BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._json(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            deltas, finish, usage = engine.turn(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for due, text in deltas:
                    time.sleep(max(0.0, due - time.perf_counter()))
                    self._event({"choices": [{"index": 0, "text": text, "finish_reason": None}]})
                self._event({"choices": [{"index": 0, "text": "", "finish_reason": finish}], "usage": usage})
                self._write(b"data: [DONE]\n\n")
                self._write(b"")

    return Handler
