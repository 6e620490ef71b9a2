"""A small search service for the `search` and `http_get` tools: an in-memory corpus, simple
term scoring, JSON over HTTP, on loopback by default.

- `GET /search?q=...&k=3` -> `{"query": q, "hits": [{"id", "title", "snippet", "score", "url"}]}`
- `GET /docs/<id>` -> the document's text (text/plain)

`latency_s` holds every response back that long, emulating a network round trip.

Scoring: for each query term in a document, idf * tf / (tf + 1). With no corpus given it
serves `DEMO_DOCUMENTS`, the help pages of the fictional shop of the `sqlite` demo. Run it
with `python -m conveyor.bench.search_service [--port 8765] [--corpus docs.jsonl]`
(one `{"id", "title", "text"}` object per line) and point CONVEYOR_SEARCH_URL at it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

MAX_K = 50


@dataclass(frozen=True, slots=True)
class Document:
    """One page of the corpus."""

    id: str
    title: str
    text: str


DEMO_DOCUMENTS = (
    Document(
        "shipping",
        "Shipping times",
        "Orders ship from our Lisbon warehouse within two working days. "
        "Delivery takes 3-5 days in Europe and 7-10 days to Canada and Kenya.",
    ),
    Document(
        "returns",
        "Returns and refunds",
        "Unused items can be returned within 30 days of delivery. "
        "Refunds go back to the original payment method within 5 working days.",
    ),
    Document(
        "warranty",
        "Warranty",
        "Furniture and electronics carry a two-year warranty; office chairs "
        "carry five years. Stationery and grocery items have no warranty.",
    ),
    Document(
        "stores",
        "Store locations",
        "Our stores are in Lisbon, Oslo, Toronto and Nairobi. "
        "All stores open 9:00-18:00 on weekdays; Oslo also opens on Saturdays.",
    ),
    Document(
        "payment",
        "Payment methods",
        "We accept cards, bank transfer and vouchers. Orders over 100 EUR may be paid in three instalments.",
    ),
    Document(
        "loyalty",
        "Loyalty programme",
        "Customers earn one point per euro spent; 100 points give "
        "a 5 EUR voucher. Points expire two years after the order.",
    ),
    Document(
        "coffee",
        "Coffee beans",
        "Our coffee beans are roasted weekly and sold in 500 g bags. "
        "Store them airtight and use them within a month of roasting.",
    ),
    Document(
        "chairs",
        "Choosing an office chair",
        "Adjust the seat so that your feet rest flat and your "
        "knees are level with your hips. The office chair has adjustable armrests.",
    ),
)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class Corpus:
    """Documents with a term index; `search` ranks them for a query."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = {d.id: d for d in documents}
        self._tf = {d.id: Counter(_tokens(f"{d.title} {d.text}")) for d in self.documents.values()}
        df = Counter(term for tf in self._tf.values() for term in tf)
        self._idf = {term: math.log(1 + len(self.documents) / n) for term, n in df.items()}

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """The best `k` documents for the query's terms, best first (ties by id)."""
        terms = set(_tokens(query))
        scored = []
        for doc_id, tf in self._tf.items():
            score = sum(self._idf[t] * tf[t] / (tf[t] + 1) for t in terms if t in tf)
            if score > 0:
                scored.append((-score, doc_id))
        return [self._hit(doc_id, -neg) for neg, doc_id in sorted(scored)[:k]]

    def _hit(self, doc_id: str, score: float) -> dict[str, Any]:
        doc = self.documents[doc_id]
        return {
            "id": doc.id,
            "title": doc.title,
            "snippet": doc.text[:160],
            "score": round(score, 4),
            "url": f"/docs/{quote(doc.id)}",
        }


class SearchHandler(BaseHTTPRequestHandler):
    """Routes GET /search and GET /docs/<id>."""

    server: SearchServer

    def do_GET(self) -> None:
        if self.server.latency_s > 0:
            time.sleep(self.server.latency_s)  # the injected network round trip
        url = urlsplit(self.path)
        doc = self.server.corpus.documents.get(unquote(url.path.removeprefix("/docs/")))
        if url.path == "/search":
            self._search(parse_qs(url.query))
        elif url.path.startswith("/docs/") and doc is not None:
            self._send(200, "text/plain; charset=utf-8", doc.text)
        else:
            self._send(404, "application/json", json.dumps({"error": f"no such path: {url.path}"}))

    def _search(self, params: dict[str, list[str]]) -> None:
        query, k = params.get("q", [""])[0], params.get("k", ["3"])[0]
        if not k.isdigit() or not 1 <= int(k) <= MAX_K:
            self._send(400, "application/json", json.dumps({"error": f"k must be an integer in 1..{MAX_K}"}))
            return
        hits = self.server.corpus.search(query, int(k))
        self._send(200, "application/json", json.dumps({"query": query, "hits": hits}))

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no line per request on stderr."""


class SearchServer(ThreadingHTTPServer):
    """The service bound to (host, port); port 0 picks a free one (see `url`)."""

    def __init__(
        self, corpus: Corpus | None = None, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0
    ) -> None:
        super().__init__((host, port), SearchHandler)
        self.corpus = corpus or Corpus(DEMO_DOCUMENTS)
        self.latency_s = latency_s

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextmanager
def serving(server: SearchServer) -> Iterator[SearchServer]:
    """Serve in a background thread for the duration of the block, then shut down."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def load_corpus(path: str) -> Corpus:
    """A corpus from a JSONL file of {"id", "title", "text"} objects."""
    with open(path, encoding="utf-8") as f:
        return Corpus(Document(**json.loads(line)) for line in f if line.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a small search corpus over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--corpus", help="JSONL file of {id, title, text}; default: the demo corpus")
    args = parser.parse_args(argv)
    server = SearchServer(load_corpus(args.corpus) if args.corpus else None, args.host, args.port)
    print(f"serving on {server.url}; export CONVEYOR_SEARCH_URL={server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
