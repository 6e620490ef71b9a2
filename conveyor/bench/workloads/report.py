"""Summaries of the workload rounds: the JSON the issue asks for, and a rich table."""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from conveyor.bench.results import provenance
from conveyor.bench.workloads.rounds import Round
from conveyor.bench.workloads.timing import efficiency, median, percentile


def summarize(runs: list[Round]) -> dict[str, Any]:
    """One case's row: medians, p90s, reduction, ideal, efficiency, spread over pairs, success."""
    lazy = [r for r in runs if r.tool_mode == "lazy"]
    partial = [r for r in runs if r.tool_mode == "partial"]
    lazy_s, partial_s = median([r.latency_s for r in lazy]), median([r.latency_s for r in partial])
    reduction = 1 - partial_s / lazy_s
    ideal = median([r.ideal_saving_s / r.latency_s for r in lazy])
    pairs = [1 - p.latency_s / q.latency_s for q, p in zip(lazy, partial)]
    return {
        "lazy_s": round(lazy_s, 4),
        "partial_s": round(partial_s, 4),
        "lazy_p90_s": round(percentile([r.latency_s for r in lazy], 90), 4),
        "partial_p90_s": round(percentile([r.latency_s for r in partial], 90), 4),
        "reduction": round(reduction, 4),
        "ideal_reduction": round(ideal, 4),
        "efficiency": _rounded(efficiency(reduction, ideal)),
        # each pair's reduction over its own lazy round's ideal (the ideal varies with the tool's time)
        "efficiency_pairs": _rounded(
            _median_or_none(
                [
                    efficiency(1 - p.latency_s / q.latency_s, q.ideal_saving_s / q.latency_s)
                    for q, p in zip(lazy, partial)
                ]
            )
        ),
        "reduction_min": round(min(pairs), 4),
        "reduction_max": round(max(pairs), 4),
        "reduction_pairs": [round(x, 4) for x in pairs],
        "rounds": len(lazy),
        "success_rate": round(sum(r.correct for r in runs) / len(runs), 4),
        "valid_call_rate": round(sum(r.valid_call for r in runs) / len(runs), 4),
        "loadavg_1m": round(median([r.loadavg_1m for r in runs]), 2),  # median over the rounds
        "same_text_rate": round(
            sum(_decoded(p) == _decoded(q) for q, p in zip(lazy, partial)) / len(lazy), 4
        ),
        "timelines": {r.tool_mode: _timeline(r) for r in (lazy[-1], partial[-1])},
        "round_details": [_detail(r) for r in runs],
    }


def _decoded(run: Round) -> str:
    """Everything the model decoded in the round, all turns (remote rounds carry no token ids)."""
    return "".join(text for _, _, text in run.deltas)


def _detail(run: Round) -> dict[str, Any]:
    """What one round decoded: tokens per model turn, and the end of its final answer."""
    return {
        "mode": run.tool_mode,
        "latency_s": round(run.latency_s, 4),
        "tokens_per_turn": [len(t) for t in run.turns],
        "correct": run.correct,
        "ideal_saving_s": round(run.ideal_saving_s, 4),
        "ideal_by_text_s": round(run.ideal_by_text_s, 4),
        "answer_tail": run.text[-160:],
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _timeline(run: Round) -> dict[str, Any]:
    spans = [[s.kind, round(s.start, 4), round(s.end, 4)] for s in run.timeline]
    tools = [[r.name, round(r.started_at, 4), round(r.done_at, 4)] for r in run.results]
    return {"latency_s": round(run.latency_s, 4), "spans": spans, "tool_runs": tools}


def report(
    mode: str, token_latency_ms: float | None, rounds: dict[str, list[Round]], extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "mode": mode,
        "token_latency_ms": token_latency_ms,
        **extra,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **provenance(),
        "workloads": {name: summarize(runs) for name, runs in rounds.items()},
    }


def print_table(console: Console, data: dict[str, Any]) -> None:
    label = "paced (emulated decode clock)" if data["mode"] == "paced" else "live (default model, this CPU)"
    table = Table(title=f"workloads, {label}: completion latency, lazy vs partial")
    for column in (
        "workload",
        "lazy s (p90)",
        "partial s (p90)",
        "reduction [min, max]",
        "ideal",
        "efficiency",
        "rounds",
        "success",
    ):
        table.add_column(column)
    for name, row in data["workloads"].items():
        eff = "n/a" if row["efficiency"] is None else f"{row['efficiency']:.0%}"
        table.add_row(
            name,
            f"{row['lazy_s']:.2f} ({row['lazy_p90_s']:.2f})",
            f"{row['partial_s']:.2f} ({row['partial_p90_s']:.2f})",
            f"{row['reduction']:.1%} [{row['reduction_min']:.1%}, {row['reduction_max']:.1%}]",
            f"{row['ideal_reduction']:.1%}",
            eff,
            str(row["rounds"]),
            f"{row['success_rate']:.0%}",
        )
    console.print(table)
