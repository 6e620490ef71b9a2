"""Database: a real SQLite database built from scikit-learn's bundled tables (iris, wine,
diabetes, breast cancer), opened at CallStart, the query run the moment its field completes.
Queries take milliseconds: the expected gain is near zero (no regression is the goal)."""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from pathlib import Path

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.config import cache_root
from conveyor.tools.builtin.sqlite import SQLiteTool

DATASETS = {
    "iris": ("load_iris", "species"),
    "wine": ("load_wine", "cultivar"),
    "diabetes": ("load_diabetes", "progression"),
    "breast_cancer": ("load_breast_cancer", "diagnosis"),
}
SYSTEM = "Answer questions about the database with one SQL query through the sqlite tool, then answer in one sentence."
TASK = "What is the average petal length (cm) of each iris species? Give the species names."


def database_path() -> Path:
    """The database file, built once into $CONVEYOR_CACHE/workloads (atomically)."""
    path = cache_root() / "workloads" / "sklearn-datasets.sqlite"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            with sqlite3.connect(tmp) as conn:
                for table, (loader, target) in DATASETS.items():
                    _add_table(conn, table, loader, target)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if not path.stat().st_mode & 0o004:  # mkstemp made it 0600: the tool's sandbox uid must read it
        path.chmod(0o644)
    return path


def _add_table(conn: sqlite3.Connection, table: str, loader: str, target: str) -> None:
    import sklearn.datasets

    data = getattr(sklearn.datasets, loader)()
    columns = [_column(name) for name in data.feature_names]
    names = getattr(data, "target_names", None)
    kind = "TEXT" if names is not None else "REAL"
    conn.execute(f"CREATE TABLE {table} ({', '.join(f'{c} REAL' for c in columns)}, {target} {kind})")
    rows = [
        [*map(float, x), str(names[int(y)]) if names is not None else float(y)]
        for x, y in zip(data.data, data.target)
    ]
    conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * (len(columns) + 1))})", rows)


def _column(feature: str) -> str:
    """'petal length (cm)' -> petal_length."""
    return re.sub(r"\W+", "_", re.sub(r"\(.*?\)", "", feature).strip()).strip("_").lower()


def _check(results, text: str) -> bool:
    """The rows hold the three species' averages (setosa 1.462, versicolor 4.26, virginica 5.552)."""
    content = results[-1].content if results else ""
    return ok_results(results) and all(v in content for v in ("1.462", "4.26", "5.552"))


def build(options: WorkloadOptions) -> Workload:
    case = Case("database", (system(SYSTEM), user(TASK)), ("sqlite",), max_tokens=160, check=_check)
    return Workload("database", [case], [SQLiteTool(str(database_path()))])
