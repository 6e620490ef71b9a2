"""Plots of the workload benchmark (matplotlib, PNG): a timeline per workload (decode and tool
runs, lazy above partial) and a bar chart of the median latencies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conveyor.bench.results import save_figure

COLORS = {"decode": "tab:green", "wait": "lightgray", "tool": "tab:orange"}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(name: str, row: dict[str, Any], mode_label: str, path: Path) -> None:
    """Decode spans and tool runs of one lazy and one partial round of a workload."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.4))
    for y, tool_mode in ((1, "lazy"), (0, "partial")):
        timeline = row["timelines"][tool_mode]
        for kind, start, end in timeline["spans"]:
            if kind in ("decode", "wait"):
                ax.broken_barh([(start, end - start)], (y - 0.3, 0.25), color=COLORS[kind])
        for _, start, end in timeline["tool_runs"]:
            ax.broken_barh([(start, max(end - start, 0.002))], (y + 0.02, 0.25), color=COLORS["tool"])
        ax.text(timeline["latency_s"], y, f" {timeline['latency_s']:.2f} s", va="center", fontsize=8)
    ax.set_yticks([0, 1], ["partial", "lazy"])
    ax.set_xlabel("seconds from the request's arrival")
    ax.set_title(f"{name} ({mode_label}): decode (green), waiting (gray), tool running (orange)", fontsize=9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_bars(data: dict[str, Any], mode_label: str, path: Path) -> None:
    """Median completion latency per workload, lazy vs partial, with the p90 as a whisker."""
    plt = pyplot()
    names = list(data["workloads"])
    rows = [data["workloads"][n] for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    xs = range(len(names))
    for offset, key, color in ((-0.2, "lazy", "tab:gray"), (0.2, "partial", "tab:blue")):
        medians = [r[f"{key}_s"] for r in rows]
        p90 = [r[f"{key}_p90_s"] - r[f"{key}_s"] for r in rows]
        ax.bar([x + offset for x in xs], medians, 0.4, yerr=[[0] * len(rows), p90], label=key, color=color)
    for x, r in zip(xs, rows):
        ax.text(x, max(r["lazy_s"], r["partial_s"]) * 1.02, f"-{r['reduction']:.0%}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=15, fontsize=8)
    ax.set_ylabel("completion latency, s (median; whisker p90)")
    ax.set_title(f"lazy vs partial execution, {mode_label}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
