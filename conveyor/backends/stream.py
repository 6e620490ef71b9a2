"""One streamed completion from a remote OpenAI-compatible engine, read by its own thread.

The engine loop is synchronous and serves many requests, while a blocking HTTP read serves
one: each `RemoteStream` reads its server-sent events in a daemon thread and puts plain
events (`StreamText`, `StreamDone`, `StreamFailed`) on the engine's queue. `close` shuts the
socket down at once, so the remote engine sees the disconnect and stops decoding the request (both vLLM and
llama.cpp server abort a request whose client went away). A request that fails before its
first text (connection refused, 429, 502-504) is retried; once text has reached the tool
layer it never is, because a retry would replay calls whose fields tools have already seen.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class StreamText:
    """New text of a stream."""

    key: tuple[str, int]  # (request id, turn number)
    text: str


@dataclass(frozen=True, slots=True)
class StreamDone:
    """The remote engine finished the turn."""

    key: tuple[str, int]
    finish_reason: str  # stop | length (as the remote engine reports it)
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The turn could not be completed: the remote engine is down, answered with an error or
    dropped the stream."""

    key: tuple[str, int]
    message: str
    status: int = 502


StreamEvent = StreamText | StreamDone | StreamFailed


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    backoff_s: float = 0.2


class RemoteStream:
    """POST `body` to `path` with streaming and report its events on `events` (see the module
    docstring). Starts reading at once."""

    def __init__(
        self,
        client: httpx.Client,
        path: str,
        body: dict[str, Any],
        key: tuple[str, int],
        events: queue.SimpleQueue[StreamEvent],
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.client = client
        self.path = path
        self.body = body
        self.key = key
        self.events = events
        self.retry = retry
        self.num_deltas = 0
        self._closed = threading.Event()
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"conveyor-remote-{key[0]}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop reading and drop the connection now; no more events come from this stream."""
        self._closed.set()
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read and sends FIN to the remote
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---- the reader thread ------------------------------------------------------------------
    def _run(self) -> None:
        event = self._attempts()
        if event is not None and not self.closed:
            self.events.put(event)

    def _attempts(self) -> StreamEvent | None:
        backoff_s = self.retry.backoff_s
        for attempt in range(self.retry.max_retries + 1):
            retryable, event = self._attempt()
            if not retryable or attempt == self.retry.max_retries or self._closed.wait(backoff_s):
                return event
            backoff_s *= 2
        return None

    def _attempt(self) -> tuple[bool, StreamEvent | None]:
        """One request. Returns (whether a retry is allowed, the final event)."""
        try:
            with self.client.stream("POST", self.path, json=self.body) as response:
                self._keep_socket(response)
                if response.status_code != 200:
                    response.read()
                    return (
                        response.status_code in RETRY_STATUSES,
                        StreamFailed(self.key, _error_message(response), response.status_code),
                    )
                return False, self._read(response)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            return True, StreamFailed(self.key, f"remote engine unreachable: {e}", 503)
        except (httpx.HTTPError, OSError, ValueError) as e:  # ValueError: a chunk that is not JSON
            if self.closed:
                return False, None
            kind = "timed out" if isinstance(e, httpx.TimeoutException) else "dropped the stream"
            return self.num_deltas == 0, StreamFailed(self.key, f"remote engine {kind}: {e!r}", 502)

    def _keep_socket(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock
        if self.closed:  # closed while connecting
            self.close()

    def _read(self, response: httpx.Response) -> StreamEvent | None:
        finish, usage = None, {}
        for line in response.iter_lines():
            if self.closed:
                return None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return StreamFailed(self.key, _message(chunk["error"]), 502)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    self.num_deltas += 1
                    self.events.put(StreamText(self.key, text))
                finish = choice.get("finish_reason") or finish
        if self.closed:
            return None
        if finish is None:
            return StreamFailed(self.key, "remote engine ended the stream without a finish_reason", 502)
        return StreamDone(self.key, finish, usage)


def _error_message(response: httpx.Response) -> str:
    try:
        detail = _message(response.json().get("error", response.json()))
    except (ValueError, AttributeError):
        detail = response.text[:500]
    return f"remote engine answered {response.status_code}: {detail}"


def _message(error: Any) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
