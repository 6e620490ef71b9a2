"""Search: our search service on loopback over the standard library's docstrings (BM25),
every response held back by an injected network latency. Partial execution connects at
CallStart, sends the query when its field completes and fetches each hit's page right after."""
from __future__ import annotations

import threading
from collections.abc import Callable

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.bench.workloads.corpus import Bm25Corpus, stdlib_documents
from conveyor.tools.builtin.http import SearchTool
from conveyor.tools.builtin.search_service import SearchServer

SYSTEM = ("You answer questions about the Python standard library. Search its documentation with the search "
          "tool, using the module and function names you expect as the query (for example, to learn how to read "
          "a gzip file, search for \"gzip open read file\"), then answer in two sentences from the pages you get.")
TASK = "Look up json.dumps in the documentation: how do I turn a Python object into an indented JSON string?"
PAGE_CHARS = 600
# One worked exchange: without it the default model searched for "example", "Python" or
# "Python programming" whatever the task named; with it, it searches for the function.
SHOT = ({"role": "user", "content": "How do I read a gzip-compressed file line by line?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "search", "arguments": '
                                         '{"query": "gzip open read", "k": 3}}\n</tool_call>'},
        {"role": "tool", "content": '[{"id": "gzip.open", "title": "gzip.open", '
                                    '"snippet": "Open a gzip-compressed file in binary or text mode"}]'},
        {"role": "assistant", "content": "Use gzip.open(path, 'rt') and iterate over the file object; "
                                         "each iteration yields one decoded line."})


def start_service(options: WorkloadOptions) -> tuple[str, Callable[[], None]]:
    """Serve the corpus in a background thread; returns its URL and a function that stops it."""
    corpus = Bm25Corpus(stdlib_documents(options.corpus_limit))
    server = SearchServer(corpus, latency_s=options.search_latency_ms / 1000)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return server.url, stop


def _check(results, text: str) -> bool:
    """The search returned pages of the json module."""
    return ok_results(results) and '"id": "json.' in results[-1].content


def build(options: WorkloadOptions) -> Workload:
    url, stop = start_service(options)
    one_call = {"type": "function", "function": {"name": "search"}}     # exactly one call, then the answer
    case = Case("search", (system(SYSTEM), *SHOT, user(TASK)), ("search",), tool_choice=one_call, max_tokens=200, check=_check)
    return Workload("search", [case], [SearchTool(url, fetch_chars=PAGE_CHARS)], [stop])
