"""How much of a baseline run's latency reduction another run keeps, workload by workload.

The remote-backend benchmark compares a run through the remote backend with a run of the embedded
engine: in the same invocation (`--embedded-baseline`), from a file (`--baseline PATH`), or
afterwards (`python -m conveyor.bench.workloads.compare RUN BASELINE`).
Two measures, because the two engines compute at different speeds:

- **share**: the reduction (1 - partial/lazy, medians) over the baseline's. A slower engine makes
  every round longer, so the same overlap is a smaller share of it.
- **seconds**: the time partial execution saved per lazy/partial pair (median over pairs) over
  the baseline's: the overlap itself, which is what the tool layer adds.

Pairs are read from `round_details`, which lists each pair's two rounds one after the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from conveyor.bench.results import write_json
from conveyor.bench.workloads.timing import median


def pair_savings(row: dict[str, Any]) -> list[float]:
    """Seconds partial execution saved in each lazy/partial pair of a workload row."""
    details = row["round_details"]
    saved = []
    for a, b in zip(details[0::2], details[1::2]):
        lazy, partial = (a, b) if a["mode"] == "lazy" else (b, a)
        saved.append(lazy["latency_s"] - partial["latency_s"])
    return saved


def compare(data: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per workload in both runs: reductions, seconds saved, and the shares of the baseline's kept."""
    rows = {}
    for name, row in data["workloads"].items():
        base = baseline["workloads"].get(name)
        if base is None:
            continue
        saved, base_saved = median(pair_savings(row)), median(pair_savings(base))
        rows[name] = {
            "reduction": row["reduction"],
            "baseline_reduction": base["reduction"],
            "saved_s": round(saved, 4),
            "baseline_saved_s": round(base_saved, 4),
            "ideal_saving_s": round(_ideal_s(row), 4),
            "baseline_ideal_saving_s": round(_ideal_s(base), 4),
            "kept_share": _ratio(row["reduction"], base["reduction"]),
            "kept_seconds": _ratio(saved, base_saved),
        }
    return rows


def _ideal_s(row: dict[str, Any]) -> float:
    """Median ideal saving of the lazy rounds (rows written before it was kept per round: from the medians)."""
    ideal = [
        d["ideal_saving_s"] for d in row["round_details"] if d["mode"] == "lazy" and "ideal_saving_s" in d
    ]
    return median(ideal) if ideal else row["ideal_reduction"] * row["lazy_s"]


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 4) if base > 0 else None


def print_comparison(console: Console, rows: dict[str, dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in (
        "workload",
        "reduction",
        "baseline",
        "kept (share)",
        "saved s / pair",
        "baseline s",
        "kept (seconds)",
        "ideal s",
        "baseline ideal s",
    ):
        table.add_column(column)
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['reduction']:.1%}",
            f"{r['baseline_reduction']:.1%}",
            _pct(r["kept_share"]),
            f"{r['saved_s']:.2f}",
            f"{r['baseline_saved_s']:.2f}",
            _pct(r["kept_seconds"]),
            f"{r['ideal_saving_s']:.2f}",
            f"{r['baseline_ideal_saving_s']:.2f}",
        )
    console.print(table)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def add_comparison(data: dict[str, Any], baseline: dict[str, Any], source: str) -> dict[str, Any]:
    """Put the comparison with the run `baseline` (read from `source`) into `data["baseline"]`."""
    data["baseline"] = {
        "source": source,
        "date": baseline.get("date"),
        "backend": baseline.get("backend"),
        "workloads": compare(data, baseline),
    }
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `conveyor bench workloads` JSON (updated in place)")
    parser.add_argument("baseline", help="the JSON of the run to compare with")
    args = parser.parse_args()
    data = add_comparison(
        json.loads(Path(args.run).read_text()), json.loads(Path(args.baseline).read_text()), args.baseline
    )
    write_json(Path(args.run), data)
    print_comparison(Console(), data["baseline"]["workloads"], f"{args.run} against {args.baseline}")


if __name__ == "__main__":
    main()
