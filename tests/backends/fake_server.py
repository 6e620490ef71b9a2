"""A tiny OpenAI-compatible streamer on loopback, scripted per request: text chunks, slow
tokens, a stream dropped midway, an error status. It records each request's body and
whether the client went away before the stream was over."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conveyor.bench.service import SseWriter


@dataclass(frozen=True, slots=True)
class Reply:
    chunks: tuple[str, ...] = ("ok",)
    finish_reason: str = "stop"
    delay_s: float = 0.0  # before each chunk: slow tokens
    drop_after: int | None = None  # close the connection after this many chunks
    status: int = 200
    error: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


def chunks_of(text: str, size: int = 3) -> tuple[str, ...]:
    return tuple(text[i : i + size] for i in range(0, len(text), size))


class FakeEngine:
    """`script`: replies in order (the last one repeats); `bodies`: the request bodies received."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.bodies: list[dict[str, Any]] = []
        self.disconnected = threading.Event()
        self.num_sent = 0  # chunks of the last reply written
        self.stop = threading.Event()
        self.connections: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self, *replies: Reply) -> None:
        self.script, self.bodies, self.num_sent = list(replies), [], 0
        self.disconnected.clear()

    def next_reply(self) -> Reply:
        return self.script.pop(0) if len(self.script) > 1 else (self.script[0] if self.script else Reply())

    def close(self) -> None:
        """Stop as a crashed engine would: no listener, and open keep-alive connections dropped."""
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _handler(fake: FakeEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(SseWriter, BaseHTTPRequestHandler):
        def setup(self) -> None:
            super().setup()
            fake.connections.add(self.connection)

        def finish(self) -> None:
            fake.connections.discard(self.connection)
            super().finish()

        def do_GET(self) -> None:
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.bodies.append(body)
            reply = fake.next_reply()
            if reply.status != 200:
                self._json(reply.status, {"error": {"message": reply.error, "type": "invalid_request_error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._stream(reply)
            except (BrokenPipeError, ConnectionResetError):
                fake.disconnected.set()

        def _stream(self, reply: Reply) -> None:
            fake.num_sent = 0
            for i, text in enumerate(reply.chunks):
                if reply.drop_after is not None and i == reply.drop_after:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.delay_s and fake.stop.wait(reply.delay_s):
                    return
                self._event({"choices": [{"index": 0, "text": text, "finish_reason": None}]})
                fake.num_sent += 1
            usage = reply.usage or {"prompt_tokens": 10, "completion_tokens": len(reply.chunks)}
            self._event(
                {"choices": [{"index": 0, "text": "", "finish_reason": reply.finish_reason}], "usage": usage}
            )
            self._write(b"data: [DONE]\n\n")
            self._write(b"")

    return Handler
