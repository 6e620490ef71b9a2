"""Built-in tools driven in-process through their hooks (start, on_field, finish, cancel)."""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.bench.search_service import (
    Corpus,
    Document,
    SearchHandler,
    SearchServer,
    serving,
)
from conveyor.tools.base import CallInfo, Tool, ToolRegistry, ToolRejected
from conveyor.tools.builtin.calculator import CalculatorError, CalculatorTool, evaluate
from conveyor.tools.builtin.http import SEARCH_URL_ENV, HttpGetTool, SearchTool
from conveyor.tools.builtin.sqlite import SQLiteTool
from conveyor.tools.builtin.validate import ValidateTool

BUILTINS = ["sqlite", "calculator", "http_get", "search", "validate"]


def begin(tool: Tool) -> Any:
    """A fresh per-call copy of a pickled tool (as a worker gets it), started."""
    call = pickle.loads(pickle.dumps(tool)).for_call()
    call.start(CallInfo("call-1", tool.name, "req-1"))
    return call


def run(tool: Tool, args: dict[str, Any]) -> Any:
    """One whole call in partial mode: start, a field at a time, finish."""
    call = begin(tool)
    for key, value in args.items():
        call.on_field(key, value)
    return call.finish(args)


def test_builtins_register_by_name_and_pickle() -> None:
    registry = ToolRegistry(BUILTINS)
    assert registry.names == BUILTINS
    for tool in registry:
        assert pickle.loads(pickle.dumps(tool)).spec() == tool.spec()
        json.dumps(tool.spec())
    assert {t.name: t.side_effects for t in registry} == {
        "sqlite": "none",
        "calculator": "none",
        "http_get": "idempotent",
        "search": "idempotent",
        "validate": "none",
    }


# ---- sqlite -----------------------------------------------------------------------------------
def test_sqlite_runs_the_query_when_the_field_completes() -> None:
    tool = SQLiteTool()
    assert "CREATE TABLE orders" in tool.description
    call = begin(tool)
    query = "SELECT category, count(*) AS n FROM products GROUP BY category ORDER BY category"
    call.on_field("query", query)
    call._conn.close()  # the rows were kept at on_field: finish needs the database no more
    call._conn = None
    assert call.finish({"query": query}) == {
        "columns": ["category", "n"],
        "truncated": False,
        "rows": [["electronics", 2], ["furniture", 2], ["grocery", 2], ["stationery", 2]],
    }


def test_sqlite_caps_rows_and_runs_a_query_it_did_not_see_at_finish() -> None:
    call = begin(SQLiteTool(max_rows=2))
    assert call.finish({"query": "SELECT id FROM orders ORDER BY id"}) == {
        "columns": ["id"],
        "rows": [[1], [2]],
        "truncated": True,
    }


@pytest.mark.parametrize(
    "query,error",
    [
        ("SELEC * FROM orders", "syntax error"),
        ("DELETE FROM orders", "readonly"),
        ("CREATE TABLE t (x)", "readonly"),
        ("PRAGMA query_only = OFF", "not authorized"),
        ("ATTACH DATABASE 'other.db' AS other", "not authorized"),
        ("SELECT 1; SELECT 2", "one statement"),
    ],
)
def test_sqlite_bad_or_writing_queries_fail(query: str, error: str) -> None:
    with pytest.raises(sqlite3.Error, match=error):
        begin(SQLiteTool()).on_field("query", query)


def test_sqlite_opens_a_file_read_only(tmp_path: Path) -> None:
    path = tmp_path / "data.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (7)")
    conn.close()
    tool = SQLiteTool(str(path))
    assert "CREATE TABLE t (x INTEGER);" in tool.description
    assert run(tool, {"query": "SELECT x FROM t"})["rows"] == [[7]]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        run(tool, {"query": "INSERT INTO t VALUES (8)"})
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_sqlite_stops_a_runaway_query() -> None:
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    with pytest.raises(TimeoutError):
        begin(SQLiteTool(timeout_s=0.1)).on_field("query", endless)


# ---- calculator -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expression,value",
    [
        ("(2 + 3) * sqrt(16)", 20.0),
        ("7 // 2 + 7 % 2 - -1", 5),
        ("2 ** 10", 1024),
        ("round(pi, 2)", 3.14),
        ("max(1, 2.5, abs(-3))", 3),
        ("log(e) + cos(0)", 2.0),
        ("2 ** -1", 0.5),
        ("10 ** 300 // 10 ** 299", 10),
    ],
)
def test_calculator_values(expression: str, value: float) -> None:
    assert run(CalculatorTool(), {"expression": expression}) == value


@pytest.mark.parametrize(
    "expression,error",
    [
        ("__import__('os').system('true')", "unknown function"),
        ("open('x')", "unknown function"),
        ("math.sqrt(4)", "unknown function"),
        ("(1).real", "not allowed"),
        ("x + 1", "not allowed"),
        ("'a' * 3", "not allowed"),
        ("[1, 2]", "not allowed"),
        ("(lambda: 1)()", "unknown function"),
        ("sqrt(x=4)", "unknown function"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 100000", "too large"),
        ("(10 ** 1000) ** 10", "too large"),
        ("round(1, -10 ** 100)", "digits"),
        ("1 / 0", "ZeroDivisionError"),
        ("exp(1000)", "OverflowError"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 +", "not an arithmetic expression"),
        ("1 + " * 1000 + "1", "longer than"),
    ],
)
def test_calculator_refuses_at_on_field(expression: str, error: str) -> None:
    with pytest.raises(CalculatorError, match=error):
        begin(CalculatorTool()).on_field("expression", expression)


def test_calculator_keeps_the_early_value_and_recomputes_a_changed_expression() -> None:
    call = begin(CalculatorTool())
    call.on_field("expression", "6 * 7")
    assert call.finish({"expression": "6 * 7"}) == 42
    assert call.finish({"expression": "6 * 8"}) == 48
    assert evaluate("1e308 * 10") == float("inf")


# ---- validate ---------------------------------------------------------------------------------
GOOD_FORM = {"name": "Ada Park", "email": "ada@example.org", "age": 36, "country": "Portugal"}


def test_validate_accepts_a_good_form_field_by_field() -> None:
    assert run(ValidateTool(), GOOD_FORM) == "ok"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("email", "ada-at-example", "field 'email': 'ada-at-example' does not match"),
        ("age", 151, "field 'age': 151 is greater than the maximum of 150"),
        ("age", "36", "field 'age': '36' is not of type 'integer'"),
        ("country", "Mars", "field 'country': 'Mars' is not one of"),
        ("nickname", "ada", "field 'nickname': not a field of this form"),
    ],
)
def test_validate_rejects_a_bad_field_at_once(key: str, value: Any, message: str) -> None:
    call = begin(ValidateTool())
    call.on_field("name", "Ada")
    with pytest.raises(ToolRejected) as info:
        call.on_field(key, value)
    assert str(info.value).startswith(message)


def test_validate_finish_checks_the_whole_form() -> None:
    call = begin(ValidateTool())
    with pytest.raises(ValueError, match="'country' is a required property"):
        call.finish({k: v for k, v in GOOD_FORM.items() if k != "country"})


def test_validate_custom_schema_with_references() -> None:
    schema = {
        "$defs": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "type": "object",
        "properties": {"currency": {"$ref": "#/$defs/code"}},
        "additionalProperties": {"type": "number"},
    }
    tool = ValidateTool(schema, name="order_form")
    call = begin(tool)
    call.on_field("currency", "EUR")
    call.on_field("amount", 12.5)
    with pytest.raises(ToolRejected, match="field 'currency'"):
        call.on_field("currency", "euro")
    with pytest.raises(ToolRejected, match="field 'note'"):
        call.on_field("note", "hi")
    assert tool.name == "order_form" and tool.parameters is schema


# ---- http_get and search, against a loopback search service ----------------------------------
class WatchedServer(SearchServer):
    """The search service, noting each accepted connection and each request path."""

    def __init__(self) -> None:
        super().__init__(Corpus([*DOCS]))
        self.RequestHandlerClass = RecordingHandler
        self.connected = threading.Event()
        self.paths: list[str] = []

    def get_request(self) -> Any:
        request = super().get_request()
        self.connected.set()
        return request


class RecordingHandler(SearchHandler):
    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        super().do_GET()


DOCS = [
    Document("a", "Apples", "Apples are red or green fruit."),
    Document("b", "Bananas", "Bananas are yellow."),
    Document("c", "Fruit salad", "Mix apples, bananas and more fruit."),
    Document("d", "Tea", "Green tea."),
]


@pytest.fixture
def server() -> Iterator[WatchedServer]:
    with serving(WatchedServer()) as watched:
        yield watched


def test_search_connects_at_start_and_queries_when_the_field_completes(server: WatchedServer) -> None:
    call = begin(SearchTool(server.url))
    assert server.connected.wait(5), "the connection was not opened at start"
    assert server.paths == []
    call.on_field("query", "green fruit")
    assert server.paths == ["/search?q=green+fruit&k=3"]  # sent before finish
    hits = call.finish({"query": "green fruit"})
    assert [h["id"] for h in hits] == ["a", "c", "d"]
    assert server.paths == ["/search?q=green+fruit&k=3"]  # finish sent nothing more


def test_search_uses_k_when_it_comes_first_and_refetches_only_for_more(server: WatchedServer) -> None:
    call = begin(SearchTool(server.url))
    call.on_field("k", 1)
    call.on_field("query", "fruit")
    assert call.finish({"k": 1, "query": "fruit"})[0]["id"] == "c"
    call = begin(SearchTool(server.url))
    call.on_field("query", "fruit")
    assert len(call.finish({"query": "fruit", "k": 2})) == 2
    call = begin(SearchTool(server.url))
    call.on_field("query", "fruit")
    assert [h["id"] for h in call.finish({"query": "fruit", "k": 4})] == ["c", "a"]
    assert server.paths == [
        "/search?q=fruit&k=1",
        "/search?q=fruit&k=3",
        "/search?q=fruit&k=3",
        "/search?q=fruit&k=4",
    ]


def test_search_url_from_the_environment_or_a_clear_error(
    server: WatchedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SEARCH_URL_ENV, server.url)
    assert run(SearchTool(), {"query": "tea"})[0]["id"] == "d"
    monkeypatch.delenv(SEARCH_URL_ENV)
    call = begin(SearchTool())
    call.on_field("query", "tea")
    with pytest.raises(RuntimeError, match=SEARCH_URL_ENV):
        call.finish({"query": "tea"})
    with pytest.raises(ValueError, match="k must be"):
        begin(SearchTool(server.url)).on_field("k", 0)


def test_http_get_connects_at_start_and_fetches_when_the_url_completes(server: WatchedServer) -> None:
    call = begin(HttpGetTool(server.url))
    assert server.connected.wait(5), "the connection was not opened at start"
    call.on_field("url", "/docs/b")
    assert server.paths == ["/docs/b"]
    assert call.finish({"url": "/docs/b"}) == {
        "url": f"{server.url}/docs/b",
        "status": 200,
        "content_type": "text/plain; charset=utf-8",
        "body": "Bananas are yellow.",
        "truncated": False,
    }
    assert server.paths == ["/docs/b"]


def test_http_get_absolute_urls_caps_and_errors(server: WatchedServer) -> None:
    loopback = ("127.0.0.1",)
    result = run(HttpGetTool(max_bytes=7, allowed_hosts=loopback), {"url": f"{server.url}/docs/a"})
    assert (result["body"], result["truncated"]) == ("Apples ", True)
    assert run(HttpGetTool(allowed_hosts=loopback), {"url": f"{server.url}/missing"})["status"] == 404
    with pytest.raises(ValueError, match="not an http"):
        run(HttpGetTool(), {"url": "ftp://example.org/x"})
    with pytest.raises(ValueError, match="not an http"):
        run(HttpGetTool(), {"url": "/docs/a"})  # relative, and no base URL


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]", "0.0.0.0"]
)
def test_http_get_refuses_hosts_that_are_not_public_unless_allowed(server: WatchedServer, host: str) -> None:
    port = server.url.rsplit(":", 1)[1]
    with pytest.raises(PermissionError, match="not a public address"):
        run(HttpGetTool(), {"url": f"http://{host}:{port}/docs/a"})
    assert server.paths == []


def test_http_cancel_closes_the_connection(server: WatchedServer) -> None:
    call = begin(HttpGetTool(server.url))
    assert call._conn is not None and call._conn.sock is not None
    call.cancel()
    assert call._conn is None
