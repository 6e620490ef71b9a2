"""The `sqlite` tool: one read-only SQL query, run the moment the query argument completes.

`SQLiteTool(path)` opens a database file read-only (a `file:...?mode=ro` URI, plus
`PRAGMA query_only`, plus an authorizer that refuses ATTACH / DETACH and pragmas that set
values). With no path it serves a small in-memory demo database, a fictional shop
(`DEMO_SQL`: customers, products, orders), rebuilt for every call: no installed package
ships a dataset to build it from. The tool's description lists the database's tables, so
that the model can write queries against them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from conveyor.tools.base import CallInfo, Tool

DEMO_SQL = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, joined TEXT NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, ordered_on TEXT NOT NULL);
INSERT INTO customers VALUES (1, 'Ada Park', 'Lisbon', '2023-02-11'), (2, 'Bram Ortiz', 'Oslo', '2023-05-30'),
    (3, 'Chen Wei', 'Lisbon', '2023-09-02'), (4, 'Dana Moss', 'Toronto', '2024-01-17'),
    (5, 'Eli Novak', 'Oslo', '2024-03-08'), (6, 'Fay Huang', 'Nairobi', '2024-06-21');
INSERT INTO products VALUES (1, 'Notebook', 'stationery', 4.5), (2, 'Fountain pen', 'stationery', 32.0),
    (3, 'Desk lamp', 'furniture', 45.0), (4, 'Office chair', 'furniture', 189.0), (5, 'USB cable', 'electronics', 7.25),
    (6, 'Headphones', 'electronics', 79.9), (7, 'Coffee beans', 'grocery', 12.0), (8, 'Green tea', 'grocery', 6.5);
INSERT INTO orders VALUES (1, 1, 1, 3, '2024-01-05'), (2, 1, 7, 2, '2024-01-20'), (3, 2, 4, 1, '2024-02-02'),
    (4, 3, 6, 1, '2024-02-14'), (5, 3, 5, 4, '2024-02-14'), (6, 4, 2, 1, '2024-03-01'), (7, 4, 1, 10, '2024-03-01'),
    (8, 5, 8, 6, '2024-03-19'), (9, 2, 3, 2, '2024-04-07'), (10, 6, 6, 2, '2024-04-22'),
    (11, 1, 3, 1, '2024-05-03'), (12, 5, 7, 3, '2024-05-15'), (13, 6, 5, 2, '2024-06-01'),
    (14, 3, 7, 1, '2024-06-09'), (15, 4, 4, 1, '2024-06-30'), (16, 2, 8, 5, '2024-07-12');
"""
_READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_DENIED_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


class SQLiteTool(Tool):
    """Runs a read-only SQL query as soon as its argument is complete; `finish` returns
    `{"columns": [...], "rows": [[...]], "truncated": bool}` with at most `max_rows` rows."""

    name = "sqlite"
    side_effects = "none"

    def __init__(self, path: str | None = None, *, max_rows: int = 50, timeout_s: float = 5.0) -> None:
        self.path = path
        self.read_paths = (str(Path(path).resolve()),) if path else ()  # bound into the worker's sandbox
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        what = "the demo shop database" if path is None else f"the SQLite database {Path(path).name}"
        self.description = (
            f"Run one read-only SQL query (SQLite dialect) on {what} and get the rows back. "
            f"Tables:\n{_schema(self._open())}"
        )
        self.parameters = {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "one SELECT statement"}},
            "required": ["query"],
            "additionalProperties": False,
        }
        self._conn: sqlite3.Connection | None = None
        self._done: tuple[str, dict[str, Any]] | None = None
        self._deadline = 0.0

    def start(self, call: CallInfo) -> None:
        """Open the database and read its schema, so that the query only has to run."""
        self._conn = self._open()
        self._conn.set_progress_handler(self._over_time, 10_000)
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

    def on_field(self, key: str, value: Any) -> None:
        """Run the query at once and keep its rows; a bad query raises sqlite3.Error here."""
        if key == "query":
            self._done = (value, self._run(value))

    def finish(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            query = args.get("query")
            if self._done is not None and self._done[0] == query:
                return self._done[1]
            return self._run(query)
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _open(self) -> sqlite3.Connection:
        """A read-only connection: the file opened with mode=ro, or the demo built in memory."""
        if self.path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            conn.executescript(DEMO_SQL)
        else:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_authorize)
        return conn

    def _run(self, query: Any) -> dict[str, Any]:
        """Execute one statement and fetch up to max_rows rows."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if self._conn is None:
            raise RuntimeError("the database is not open: start() must come first")
        self._deadline = time.perf_counter() + self.timeout_s
        try:
            cursor = self._conn.execute(query)
            rows = cursor.fetchmany(self.max_rows + 1)
        except sqlite3.OperationalError:
            if time.perf_counter() > self._deadline:
                raise TimeoutError(f"the query ran longer than {self.timeout_s} s") from None
            raise
        columns = [d[0] for d in cursor.description or ()]
        return {
            "columns": columns,
            "rows": [list(r) for r in rows[: self.max_rows]],
            "truncated": len(rows) > self.max_rows,
        }

    def _over_time(self) -> int:
        """SQLite's progress handler: non-zero interrupts the running statement."""
        return int(time.perf_counter() > self._deadline)


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
    """Refuse ATTACH / DETACH and pragmas that set a value (query_only=OFF, ...)."""
    if action in _DENIED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and arg1 not in _READ_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _schema(conn: sqlite3.Connection, max_chars: int = 4000) -> str:
    """The CREATE statements of the database's tables and views (closes `conn`)."""
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    finally:
        conn.close()
    text = "\n".join(" ".join(sql.split()) + ";" for (sql,) in rows)
    return text if len(text) <= max_chars else text[:max_chars] + "\n..."
