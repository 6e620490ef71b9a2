"""The soak's verdicts and its files: the JSON (`bench/results.write_json`), a markdown table
and a plot of the server's RSS, open file descriptors, descendants and KV blocks over time."""

from __future__ import annotations

import argparse
import shlex
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from conveyor.bench.results import machine_info, save_figure, write_json, write_text
from conveyor.bench.soak_load import parse_mix
from conveyor.bench.soak_probe import AWAITING, KV_USED, RUNNING, matching


def is_idle(metrics: dict[str, float]) -> bool:
    """No request running or waiting on a tool, no KV block in use, no worker busy (where the
    server counts busy workers)."""
    busy = matching(metrics, "busy")
    return (
        metrics.get(RUNNING, 0) == 0
        and metrics.get(KV_USED, 0) == 0
        and metrics.get(AWAITING, 0) == 0
        and not any(busy.values())
    )


def growth(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median of the last quarter of the run minus the first quarter's, and least-squares
    slopes (per hour) over the whole run and over its second half."""
    end = samples[-1]["t_s"]
    first = [s[key] for s in samples if s["t_s"] <= end / 4]
    last = [s[key] for s in samples if s["t_s"] >= end * 3 / 4]
    first_median, last_median = statistics.median(first), statistics.median(last)
    return {
        "first_quarter_median": first_median,
        "last_quarter_median": last_median,
        "growth": round(last_median - first_median, 2),
        "slope_per_h": _slope(samples, key, 0.0),
        "slope_per_h_second_half": _slope(samples, key, end / 2),
        "min": min(s[key] for s in samples),
        "max": max(s[key] for s in samples),
    }


def _slope(samples: list[dict[str, Any]], key: str, from_s: float) -> float | None:
    points = [(s["t_s"], s[key]) for s in samples if s["t_s"] >= from_s]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    return round(statistics.linear_regression([t for t, _ in points], [v for _, v in points]).slope * 3600, 2)


def _verdict(name: str, value: Any, bound: str, ok: bool | None) -> dict[str, Any]:
    return {"name": name, "value": value, "bound": bound, "pass": ok}


def verdicts(args: argparse.Namespace, run: dict[str, Any], rss: dict, fds: dict) -> list[dict[str, Any]]:
    """Each check of the soak: `pass` is True, False, or None where the server does not count
    the thing (e.g. busy workers on a server without worker metrics)."""
    end, outcomes = run["end"], run["outcomes"]["outcomes"]
    first_quarter = [s for s in run["samples"] if s["t_s"] <= run["samples"][-1]["t_s"] / 4]
    workers_bound = max(s["num_descendants"] for s in first_quarter)
    busy = end["sample"]["busy_workers"]
    tool_results = sum(run["outcomes"]["tool_results"].values())
    wants_tools = parse_mix(args.mix).get("server_tool", 0) > 0
    return [
        _verdict("server alive through the load", run["server_alive"], "true", run["server_alive"]),
        _verdict("clients finished", run["clients_stopped"], "true", run["clients_stopped"]),
        _verdict(
            "server idle after the load (s)", end["idle_after_s"], f"<= {args.idle_timeout_s:g}", end["idle"]
        ),
        _verdict("/health after the load", end["healthy"], "200", end["healthy"]),
        _verdict(
            "KV blocks used at idle",
            end["sample"]["kv_blocks_used"],
            "0",
            end["sample"]["kv_blocks_used"] == 0,
        ),
        _verdict(
            "requests running at idle",
            end["sample"]["requests_running"],
            "0",
            end["sample"]["requests_running"] == 0 and end["sample"]["requests_awaiting_tools"] == 0,
        ),
        _verdict("busy workers at idle", busy, "0", None if busy is None else busy == 0),
        _verdict(
            "server descendants at idle",
            end["sample"]["num_descendants"],
            f"<= {workers_bound} (first quarter)",
            end["sample"]["num_descendants"] <= workers_bound,
        ),
        _verdict(
            "server exit after SIGTERM",
            run["exit_code"],
            f"0 or -15 within {run['stop_limit_s']:g} s",
            run["exit_code"] in (0, -signal.SIGTERM),
        ),  # uvicorn re-raises the signal once shut down
        _verdict("orphan processes after stop", len(run["orphans"]), "0", not run["orphans"]),
        _verdict("HTTP 5xx", outcomes.get("5xx", 0), "0", outcomes.get("5xx", 0) == 0),
        _verdict(
            "client errors (transport, truncated streams, accepted invalid requests)",
            outcomes.get("error", 0),
            "0",
            outcomes.get("error", 0) == 0,
        ),
        _verdict(
            "unexpected 4xx", outcomes.get("unexpected_4xx", 0), "0", outcomes.get("unexpected_4xx", 0) == 0
        ),
        _verdict(
            "server RSS growth, last quarter - first (MB)",
            rss["growth"],
            f"<= {args.max_rss_growth_mb:g}",
            rss["growth"] <= args.max_rss_growth_mb,
        ),
        _verdict(
            "server open FD growth, last quarter - first",
            fds["growth"],
            f"<= {args.max_fd_growth:g}",
            fds["growth"] <= args.max_fd_growth,
        ),
        _verdict(
            "exercised: ok answers and server tool results",
            [outcomes.get("ok", 0), tool_results],
            ">= 1 each" if wants_tools else ">= 1 ok (no server tools in --mix)",
            outcomes.get("ok", 0) > 0 and (tool_results > 0 or not wants_tools),
        ),
    ]


def build(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """The result document from the soak's raw record."""
    samples = run["samples"]
    rss, fds = growth(samples, "rss_mb"), growth(samples, "num_fds")
    checks = verdicts(args, run, rss, fds)
    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "bench_command")}
    return {
        "command": _command(),
        "options": options,
        "machine": machine_info(),
        "started_at": run["started_at"],
        "server_command": run["server_command"],
        "subreaper": run["subreaper"],
        "load_s": run["load_s"],
        "num_requests_sent": run["num_sent"],
        "requests": run["outcomes"],
        "growth": {"rss_mb": rss, "num_fds": fds},
        "end": run["end"],
        "stop_s": run["stop_s"],
        "exit_code": run["exit_code"],
        "orphans": run["orphans"],
        "server_log_tracebacks": run["server_log_tracebacks"],
        "verdicts": checks,
        "pass": all(c["pass"] is not False for c in checks),
        "samples": samples,
    }


def _command() -> str:
    """The command line as typed (`python -m conveyor.cli ...` shown as `conveyor ...`)."""
    if Path(sys.argv[0]).name in ("conveyor", "cli.py"):
        return shlex.join(["conveyor", *sys.argv[1:]])
    return shlex.join(sys.argv)


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(x) for x in row) + " |" for row in rows),
    ]


def markdown(result: dict[str, Any]) -> str:
    m, req = result["machine"], result["requests"]
    mark = {True: "pass", False: "**FAIL**", None: "n/a"}
    lines = [
        f"# conveyor bench soak: {'all verdicts pass' if result['pass'] else 'FAILED'}",
        "",
        (
            f"`{result['command']}` ({result['started_at']}), {result['load_s']} s of load, "
            f"{result['num_requests_sent']} requests, on {m['cpu_model']} ({m['num_cpus']} CPUs; "
            f"{', '.join(m['instruction_sets'])})."
        ),
        "",
        *_table(
            [[c["name"], c["value"], c["bound"], mark[c["pass"]]] for c in result["verdicts"]],
            ["verdict", "value", "bound", "result"],
        ),
        "",
    ]
    for key, label in (("rss_mb", "server RSS (MB)"), ("num_fds", "server open FDs")):
        g = result["growth"][key]
        lines.append(
            f"- {label}: first quarter median {g['first_quarter_median']}, last {g['last_quarter_median']}, "
            f"min {g['min']}, max {g['max']}; slope {g['slope_per_h']} per hour "
            f"(second half {g['slope_per_h_second_half']})"
        )
    kinds = sorted({o for c in req["by_kind"].values() for o in c})
    lines += [
        "",
        *_table([[k, *(c.get(o, 0) for o in kinds)] for k, c in req["by_kind"].items()], ["request", *kinds]),
        "",
        f"finish reasons: {req['finish_reasons']}",
        "",
        f"server tool results (tool:kind): {req['tool_results']}",
        "",
        f"tracebacks in the server's log: {result['server_log_tracebacks']}",
    ]
    if req["details"]:
        lines += ["", "first failures:", *(f"- {d}" for d in req["details"])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS (server and its descendants), open FDs and descendants, KV blocks and running requests."""
    from conveyor.bench.plots import pyplot

    plt = pyplot()
    samples = result["samples"]
    t = [s["t_s"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples], label="server RSS, MB")
    workers = axes[0].twinx()  # a scale of its own: the server's growth must stay visible
    workers.plot(
        t, [s["descendants_rss_mb"] for s in samples], color="tab:orange", label="descendants' RSS, MB"
    )
    workers.legend(fontsize=8, loc="lower right")
    axes[1].plot(t, [s["num_fds"] for s in samples], label="server open FDs")
    axes[1].plot(t, [s["num_descendants"] for s in samples], label="server descendants")
    axes[2].plot(t, [s["kv_blocks_used"] or 0 for s in samples], label="KV blocks used")
    axes[2].plot(t, [s["requests_running"] or 0 for s in samples], label="requests in flight")
    axes[2].set_xlabel("seconds of load")
    for ax in axes:
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_title(
        f"conveyor bench soak ({result['load_s']} s, {result['num_requests_sent']} requests)", fontsize=9
    )
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def write(path: Path, result: dict[str, Any]) -> None:
    write_json(path, result)
    write_text(path.with_suffix(".md"), markdown(result))
    plot(result, path.with_suffix(".png"))
