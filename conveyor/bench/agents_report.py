"""The agents benchmark's numbers, table and plots, from the runs' records.

Per run (a system at a rate, one repeat): job completion time (a program's arrival to its last
answer) p50/p90 over the programs that completed; completed programs per second within the
JCT bound (those whose JCT is within it, over the run's wall time); follow-up TTFT p50/p90
(every request after a program's first); prefilled tokens per request (prompt tokens less the
cached ones); the share of each follow-up's repeated prefix served from cache (cached tokens
over the previous request's prompt and output tokens, capped at 1). Per system and rate the
medians over repeats with their min and max; ratios against the baseline system per repeat.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from conveyor.bench.plots import pyplot
from conveyor.bench.results import save_figure

METRICS = (
    ("jct_p50_s", "JCT p50 s"),
    ("jct_p90_s", "JCT p90 s"),
    ("goodput", "programs/s within bound"),
    ("follow_up_ttft_p50_s", "follow-up TTFT p50 s"),
    ("follow_up_ttft_p90_s", "follow-up TTFT p90 s"),
    ("prefilled_per_request", "prefilled tokens / request"),
    ("repeated_prefix_cached", "repeated prefix from cache"),
    ("completed", "completed"),
)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_metrics(run: dict[str, Any], bound_s: float) -> dict[str, float]:
    programs = run["programs"]
    done = [p for p in programs if not p["error"]]
    jcts = [p["jct_s"] for p in done]
    turns = [t for p in programs for t in p["turns"]]
    follow = [t for t in turns if t["index"] > 0]
    shares = [min(1.0, t["cached_tokens"] / t["repeated_tokens"]) for t in follow if t["repeated_tokens"]]
    return {
        "jct_p50_s": pct(jcts, 0.5),
        "jct_p90_s": pct(jcts, 0.9),
        "goodput": sum(1 for j in jcts if j <= bound_s) / run["wall_s"],
        "follow_up_ttft_p50_s": pct([t["ttft_s"] for t in follow], 0.5),
        "follow_up_ttft_p90_s": pct([t["ttft_s"] for t in follow], 0.9),
        "prefilled_per_request": statistics.fmean(t["prompt_tokens"] - t["cached_tokens"] for t in turns)
        if turns
        else float("nan"),
        "repeated_prefix_cached": statistics.fmean(shares) if shares else float("nan"),
        "completed": len(done) / max(1, len(programs)),
        "calls_match": sum(t["calls_match"] for t in turns) / max(1, len(turns)),
    }


def summarize(runs: list[dict[str, Any]], baseline: str, bound_s: float) -> dict[str, Any]:
    """Per system and rate: each metric's median over repeats, its min and max, and the ratio
    to the baseline's run of the same repeat (median, min, max)."""
    for run in runs:
        run["metrics"] = run_metrics(run, bound_s)
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        cell = table.setdefault(run["system"], {}).setdefault(str(run["rate"]), {"runs": []})
        cell["runs"].append(run["metrics"])
    for rates in table.values():
        for rate, cell in rates.items():
            base = table.get(baseline, {}).get(rate, {}).get("runs", [])
            for key in [k for k, _ in METRICS] + ["calls_match"]:
                values = [m[key] for m in cell["runs"]]
                cell[key] = _spread(values)
                if base and len(base) == len(values):
                    ratios = [v / b[key] for v, b in zip(values, base) if b[key]]
                    cell[f"{key}_vs_{baseline}"] = _spread(ratios)
    return table


def _spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]  # NaN: nothing to measure in that run
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(result: dict[str, Any]) -> str:
    prov, cfg = result["provenance"], result["config"]
    lines = [
        "# Agent programs: `conveyor bench agents`",
        "",
        f"Command: `{prov['command']}`  ",
        (
            f"CPU: {prov['machine']['cpu_model']}, {prov['machine']['num_cpus']} CPUs; instruction sets: "
            f"{', '.join(prov['machine']['instruction_sets'])}  "
        ),
        (
            f"Date (UTC): {prov['date_utc']}; load averages (1/5/15 min) at the start {result['loadavg_at_start']}, "
            f"at the end {prov['loadavg_at_end']} (the machine is shared: timings are noisy)  "
        ),
        (
            f"Model: {cfg['model']}; programs: {cfg['programs_summary']}; tool latency: lognormal, median "
            f"{cfg['tool_median_s']} s, sigma {cfg['tool_sigma']}; Poisson program arrivals at {cfg['rates']} programs/s; "
            f"{cfg['repeats']} repeat(s), systems interleaved in rotating order; JCT bound {result['jct_bound_s']:.1f} s "
            f"({result['jct_bound_rule']})"
        ),
        "",
        "Systems: " + "; ".join(f"`{k}`: {v}" for k, v in result["systems"].items()),
        "",
    ]
    for rate in cfg["rates"]:
        lines += [f"## {rate} programs/s", "", "| system | " + " | ".join(t for _, t in METRICS) + " |"]
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for system, rates in result["summary"].items():
            cell = rates.get(str(rate))
            if cell:
                lines.append(f"| {system} | " + " | ".join(_cell(cell[k]) for k, _ in METRICS) + " |")
        lines.append("")
    lines += ["Cells: median over repeats [min-max]. " + result["notes"], ""]
    return "\n".join(lines)


def _cell(s: dict[str, float]) -> str:
    if math.isnan(s["median"]):
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.3g}"
    return f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]"


def plot_kv(runs: list[dict[str, Any]], path: Path) -> None:
    """KV blocks in use (and kept for sessions, where the server reports it) over time, one
    line per Conveyor system, at the highest rate's first repeat."""
    plt = pyplot()
    top = max(r["rate"] for r in runs)
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        if run["rate"] != top or run["repeat"] != 0 or not run["kv_samples"]:
            continue
        t = [s["t_s"] for s in run["kv_samples"]]
        for key in sorted({k for s in run["kv_samples"] for k in s if k != "t_s"}):
            if "awaiting" in key:
                continue
            ax.plot(
                t,
                [s.get(key, 0) for s in run["kv_samples"]],
                label=f"{run['system']}: {key.removeprefix('conveyor_')}",
            )
    ax.set_xlabel("seconds since the first arrival")
    ax.set_ylabel("KV blocks")
    ax.set_title(f"KV blocks over time, {top} programs/s")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_jct(summary: dict[str, Any], rates: list[float], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    systems = list(summary)
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        p90 = [
            summary[system].get(str(r), {}).get("jct_p90_s", {}).get("median", float("nan")) for r in rates
        ]
        ax.bar([j + i * width for j in range(len(rates))], p90, width, label=system)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rates))], [f"{r}/s" for r in rates])
    ax.set_ylabel("job completion time p90 (s)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
