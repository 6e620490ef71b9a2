"""Loopback services the benchmarks start in processes of their own (the search service, the paced
stand-in engine), and the streamed-response writing they share with the tests' fake engine."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from socketserver import BaseServer
from typing import Any

STOP_S = 5.0


def start_service(
    target: Callable[..., None], args: tuple[Any, ...], name: str, start_s: float
) -> tuple[str, Callable[[], None]]:
    """Run `target(conn, *args)` in a spawned child, which sends its URL on `conn` once it serves
    (`serve_until_stopped`); returns that URL and a function that stops the child. Raises
    RuntimeError, leaving no child behind, when no URL comes within `start_s`."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
    process.start()
    child_conn.close()

    def stop() -> None:
        with contextlib.suppress(OSError):
            conn.send("stop")  # a clean exit: the child's finalizers run
        process.join(STOP_S)
        if process.is_alive():
            process.terminate()
            process.join(STOP_S)
        conn.close()

    try:
        if not conn.poll(start_s):
            raise RuntimeError(f"{name} did not start within {start_s:g} s")
        return conn.recv(), stop
    except BaseException:
        stop()
        raise


def serve_until_stopped(conn: Connection, server: BaseServer, url: str) -> None:
    """In the child: send `url`, then serve until the parent says stop or goes away."""

    def stop_on_message() -> None:
        with contextlib.suppress(EOFError, OSError):
            conn.recv()  # "stop", or the parent is gone
        server.shutdown()

    threading.Thread(target=stop_on_message, daemon=True).start()
    conn.send(url)
    server.serve_forever(poll_interval=0.05)
    server.server_close()


class SseWriter:
    """Mixed into a quiet HTTP/1.1 `BaseHTTPRequestHandler`: JSON answers, and streamed answers
    (`Transfer-Encoding: chunked`) of one server-sent event per chunk, as OpenAI-compatible
    engines stream."""

    protocol_version = "HTTP/1.1"
    wfile: Any

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, data: dict[str, Any]) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _event(self, data: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(data)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
