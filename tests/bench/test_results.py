"""write_json: the benchmarks' one atomic JSON writer."""
from __future__ import annotations

import json
from pathlib import Path

from conveyor.bench.results import write_json


def test_write_json_creates_the_folder_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "results" / "run.json"
    write_json(path, {"a": [1, 2]}, indent=2)
    write_json(path, {"a": [3]})                       # replaces the earlier result
    assert json.loads(path.read_text()) == {"a": [3]}
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
