"""Benchmark result files, written atomically: a temp file beside the target, then a rename,
so an interrupted run never leaves a half-written JSON, table or plot where a reader expects a
result."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _temp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_suffix(path.suffix + ".tmp")


def write_text(path: Path, text: str) -> None:
    tmp = _temp(path)
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def save_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure (its format from ``path``'s suffix) and release it."""
    import matplotlib.pyplot as plt

    tmp = _temp(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **savefig_kwargs)
    finally:
        plt.close(fig)
    tmp.replace(path)
