"""write_json and save_figure: the benchmarks' atomic result writers."""

from __future__ import annotations

import json
from pathlib import Path

from conveyor.bench.results import save_figure, write_json


def test_write_json_creates_the_folder_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "results" / "run.json"
    write_json(path, {"a": [1, 2]}, indent=2)
    write_json(path, {"a": [3]})  # replaces the earlier result
    assert json.loads(path.read_text()) == {"a": [3]}
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_save_figure_writes_the_format_of_its_suffix_and_no_temp_file(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plot.png"
    save_figure(fig, path, dpi=50)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert not plt.get_fignums()  # the figure was released
