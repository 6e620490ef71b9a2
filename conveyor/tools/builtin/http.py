"""The `http_get` and `search` tools: HTTP GET with partial execution.

With a base URL known up front, `start` opens the TCP connection while the model is still
writing the arguments; the request goes out the moment its argument completes (`on_field`),
and the response is read there, so `finish` usually only hands over what has arrived.

Server-side request forgery: a URL's host is connected to only if it is the base URL's host
or one of `allowed_hosts`, or if every address it resolves to is a public one (never
loopback, private, link-local, reserved or multicast); the connection goes to the address
that was checked, so a second DNS answer cannot redirect it. Redirects are not followed.
These tools declare `network`: their workers share the host's network namespace, which the
sandbox of other tools does not (see docs/security.md).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPSConnection
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from conveyor.tools.base import CallInfo, Tool

SEARCH_URL_ENV = "CONVEYOR_SEARCH_URL"
_Origin = tuple[str, str, int | None]


@dataclass(frozen=True, slots=True)
class Response:
    """What came back: status, content type, the body (at most the tool's cap) as text."""

    status: int
    content_type: str
    text: str
    truncated: bool


class _HttpTool(Tool):
    """Shared connection handling: one keep-alive connection per call, opened at `start`
    when a base URL is known, replaced if a request goes to another origin."""

    side_effects = "idempotent"
    cpu_bound = False  # its hooks wait on the network
    network = True

    def __init__(self, base_url: str | None, timeout_s: float, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | (
            {urlsplit(base_url).hostname or ""} if base_url else set()
        )
        self._conn: HTTPConnection | None = None
        self._origin: _Origin | None = None

    def start(self, call: CallInfo) -> None:
        """Open the connection to the base URL's host before the arguments arrive."""
        if self.base_url:
            self._open(self.base_url)

    def cancel(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn, self._origin = None, None

    def _open(self, url: str) -> HTTPConnection:
        """The connection to the URL's origin, connecting (or reconnecting) if needed."""
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port)
        if self._conn is None or origin != self._origin:
            self.cancel()
            kind = {"http": HTTPConnection, "https": HTTPSConnection}.get(parts.scheme)
            if kind is None or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            conn = kind(parts.hostname, parts.port, timeout=self.timeout_s)
            address = self._address(parts.hostname, parts.port or conn.default_port)
            if address is not None:  # connect to the address that was checked
                conn._create_connection = lambda addr, timeout, source: socket.create_connection(  # type: ignore[attr-defined]
                    (address, addr[1]), timeout, source
                )
            conn.connect()
            self._conn, self._origin = conn, origin
        return self._conn

    def _address(self, host: str, port: int) -> str | None:
        """None for a configured host; else the first address of `host`, PermissionError if any
        of its addresses is not public."""
        if host.lower() in self.allowed_hosts:
            return None
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global or ip.is_multicast:
                raise PermissionError(
                    f"{host} resolves to {address}, which is not a public address "
                    "(loopback, private and link-local hosts need allowed_hosts)"
                )
        return addresses[0]

    def _get(self, url: str, max_bytes: int) -> Response:
        """Send a GET for an absolute URL and read at most max_bytes of the body."""
        conn = self._open(url)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Accept": "*/*", "User-Agent": "conveyor-tool"})
        response = conn.getresponse()
        body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            self.cancel()  # the rest stays unread: this connection cannot serve another request
        charset = response.headers.get_content_charset() or "utf-8"
        return Response(
            response.status,
            response.getheader("Content-Type", ""),
            body[:max_bytes].decode(charset, errors="replace"),
            len(body) > max_bytes,
        )


class HttpGetTool(_HttpTool):
    """GET a URL; `finish` returns `{"url", "status", "content_type", "body", "truncated"}`.
    With `base_url`, relative URLs resolve against it and the connection opens at `start`.
    Hosts that are not public need `allowed_hosts` (the base URL's host is allowed)."""

    name = "http_get"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = 20_000,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        super().__init__(base_url, timeout_s, allowed_hosts)
        self.max_bytes = max_bytes
        self.description = "Fetch a web page with HTTP GET; returns the status and the body text."
        if base_url:
            self.description += f" Relative URLs are resolved against {base_url}."
        self.parameters = {
            "type": "object",
            "properties": {"url": {"type": "string", "description": "an http(s) URL"}},
            "required": ["url"],
            "additionalProperties": False,
        }
        self._done: tuple[str, dict[str, Any]] | None = None

    def on_field(self, key: str, value: Any) -> None:
        """Send the request at once and read the response."""
        if key == "url":
            self._done = (value, self._fetch(value))

    def finish(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            url = args.get("url")
            return self._done[1] if self._done is not None and self._done[0] == url else self._fetch(url)
        finally:
            self.cancel()

    def _fetch(self, url: Any) -> dict[str, Any]:
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty string, got {url!r}")
        absolute = urljoin(self.base_url or "", url)
        response = self._get(absolute, self.max_bytes)
        return {
            "url": absolute,
            "status": response.status,
            "content_type": response.content_type,
            "body": response.text,
            "truncated": response.truncated,
        }


class SearchTool(_HttpTool):
    """Query a search service (`conveyor/bench/search_service.py` speaks its protocol): `GET
    {base_url}/search?q=...&k=...`; `finish` returns the hits, best first. `base_url` defaults
    to the CONVEYOR_SEARCH_URL environment variable, read when the tool is made."""

    name = "search"
    description = "Search the document collection; returns the best matching pages (id, title, snippet, url)."

    def __init__(
        self,
        base_url: str | None = None,
        *,
        default_k: int = 3,
        max_k: int = 20,
        timeout_s: float = 10.0,
        fetch_chars: int = 0,
    ) -> None:
        """`fetch_chars` > 0: also fetch each hit's page right after the search (on the same
        connection) and add its first `fetch_chars` characters to the hit as "text"."""
        super().__init__(base_url or os.environ.get(SEARCH_URL_ENV), timeout_s)
        self.fetch_chars = fetch_chars
        self.default_k = default_k
        self.max_k = max_k
        self.parameters = {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to look for"},
                "k": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": max_k,
                    "default": default_k,
                    "description": "how many results",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        }
        self._k = default_k
        self._done: tuple[str, int, list[Any]] | None = None

    def on_field(self, key: str, value: Any) -> None:
        """`query`: send the search at once, with `k` if it came first, else the default."""
        if key == "k":
            self._k = self._checked_k(value)
        elif key == "query" and self.base_url:
            self._done = (value, self._k, self._search(value, self._k))

    def finish(self, args: dict[str, Any]) -> list[Any]:
        try:
            query, k = args.get("query"), self._checked_k(args.get("k", self.default_k))
            if self._done is not None and self._done[0] == query and self._done[1] >= k:
                return self._done[2][:k]
            return self._search(query, k)
        finally:
            self.cancel()

    def _checked_k(self, k: Any) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise ValueError(f"k must be an integer in 1..{self.max_k}, got {k!r}")
        return k

    def _search(self, query: Any, k: int) -> list[Any]:
        if not self.base_url:
            raise RuntimeError(
                f"no search service configured: give SearchTool a base_url or set {SEARCH_URL_ENV}"
            )
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {query!r}")
        url = self.base_url.rstrip("/") + "/search?" + urlencode({"q": query, "k": k})
        response = self._get(url, 1_000_000)
        if response.status != 200:
            raise RuntimeError(f"the search service answered {response.status}: {response.text[:200]}")
        hits = json.loads(response.text)["hits"]
        if self.fetch_chars > 0:
            for hit in hits:
                page = self._get(urljoin(self.base_url, hit["url"]), self.fetch_chars)
                hit["text"] = page.text if page.status == 200 else f"(HTTP {page.status})"
        return hits
