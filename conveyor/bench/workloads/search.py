"""Search: our search service on loopback over the standard library's docstrings (BM25),
every response held back by an injected network latency. Partial execution connects at
CallStart, sends the query when its field completes and fetches each hit's page right after."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection

from conveyor.bench import service
from conveyor.bench.search_service import SearchServer
from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.bench.workloads.corpus import Bm25Corpus, stdlib_documents
from conveyor.tools.builtin.http import SearchTool

SYSTEM = (
    "You answer questions about the Python standard library. Search its documentation with the search "
    "tool, using the module and function names you expect as the query (for example, to learn how to read "
    'a gzip file, search for "gzip open read file"), then answer in two sentences from the pages you get.'
)
TASK = "Look up json.dumps in the documentation: how do I turn a Python object into an indented JSON string?"
PAGE_CHARS = 600
SERVICE_START_S = 120.0  # indexing every stdlib docstring takes a few seconds
# One worked exchange: without it the default model searched for "example", "Python" or
# "Python programming" whatever the task named; with it, it searches for the function.
SHOT = (
    {"role": "user", "content": "How do I read a gzip-compressed file line by line?"},
    {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "search", "arguments": '
        '{"query": "gzip open read", "k": 3}}\n</tool_call>',
    },
    {
        "role": "tool",
        "content": '[{"id": "gzip.open", "title": "gzip.open", '
        '"snippet": "Open a gzip-compressed file in binary or text mode"}]',
    },
    {
        "role": "assistant",
        "content": "Use gzip.open(path, 'rt') and iterate over the file object; "
        "each iteration yields one decoded line.",
    },
)


def start_service(options: WorkloadOptions) -> tuple[str, Callable[[], None]]:
    """Serve the corpus from a process of its own, as a remote service would be (in a thread of
    the engine's process its request handling took the engine's GIL, slowing the decode of
    partial rounds only); returns its URL and a function that stops it."""
    return service.start_service(
        _serve,
        (options.corpus_limit, options.search_latency_ms / 1000),
        "conveyor-search-service",
        SERVICE_START_S,
    )


def _serve(conn: Connection, corpus_limit: int, latency_s: float) -> None:
    server = SearchServer(Bm25Corpus(stdlib_documents(corpus_limit)), latency_s=latency_s)
    service.serve_until_stopped(conn, server, server.url)


def _check(results, text: str) -> bool:
    """The search returned pages of the json module."""
    return ok_results(results) and '"id": "json.' in results[-1].content


def build(options: WorkloadOptions) -> Workload:
    url, stop = start_service(options)
    # exactly one call, then the answer: the first turn must call search, and a call in the turn
    # after the results ends the round unrun (the default model, given its call back as the
    # template spells it, repeats the call as bare JSON; see docs/results/workloads-remote.md)
    one_call = {"type": "function", "function": {"name": "search"}}
    case = Case(
        "search",
        (system(SYSTEM), *SHOT, user(TASK)),
        ("search",),
        tool_choice=one_call,
        max_tokens=200,
        check=_check,
        max_tool_rounds=1,
    )
    return Workload("search", [case], [SearchTool(url, fetch_chars=PAGE_CHARS)], [stop])
