"""The `conveyor bench workloads` command: flags, the run, the JSON, the table and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console

from conveyor.bench.results import write_json
from conveyor.bench.workloads import BUILDERS
from conveyor.bench.workloads.base import WorkloadOptions
from conveyor.bench.workloads.compare import add_comparison, print_comparison
from conveyor.bench.workloads.paced import Pace
from conveyor.bench.workloads.report import print_table, report
from conveyor.bench.workloads.runner import RECORDED, BenchOptions, run_workloads
from conveyor.config import EngineConfig, engine_config_from_flags


def add_workloads_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=["paced", "live"],
        default="paced",
        help="paced: recorded outputs on an emulated decode clock; live: the model on this machine",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help=(
            "measured lazy/partial pairs per case (odd; after one discarded warm-up pair; the mode that goes first "
            "alternates)"
        ),
    )
    parser.add_argument(
        "--json", default=None, help="where to write the results (default docs/results/workloads-<mode>.json)"
    )
    parser.add_argument("--plots", default="docs/results", help="folder for the PNG plots ('' for none)")
    parser.add_argument("--workloads", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument(
        "--token-latency-ms",
        type=float,
        default=Pace().token_latency_ms,
        help="paced: one decode step (default: a 7B model at batch 1 on an A100)",
    )
    parser.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=Pace().prefill_ms_per_token,
        help="paced: cost of each prompt token a step prefills",
    )
    parser.add_argument(
        "--search-latency-ms",
        type=float,
        default=WorkloadOptions().search_latency_ms,
        help="injected round trip of every search-service request",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="live: sampling temperature")
    parser.add_argument(
        "--record",
        action="store_true",
        help="live: write each case's lazy-round tokens as the paced mode's recorded output",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of workloads not run now from an existing --json file",
    )
    parser.add_argument(
        "--recorded-dir", default=str(RECORDED), help="where recorded outputs are read and written"
    )
    parser.add_argument(
        "--paced-remote",
        action="store_true",
        help="paced: drive the recorded outputs through the remote backend (RemoteEngine) and a "
        "stand-in remote engine that streams them over HTTP on the same clock",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="a workloads JSON to compare with (e.g. the embedded "
        "engine's, for a --backend run): the share of its reduction each workload keeps",
    )
    parser.add_argument(
        "--embedded-baseline",
        action="store_true",
        help="with --backend or --paced-remote: first run the same workloads on the embedded engine, "
        "in this invocation, and compare with that",
    )


def run_workloads_bench(args: argparse.Namespace) -> dict:
    config = engine_config_from_flags(args)
    pace = Pace(args.token_latency_ms, args.prefill_ms_per_token)
    options = BenchOptions(
        args.mode,
        args.rounds,
        tuple(args.workloads),
        pace,
        WorkloadOptions(search_latency_ms=args.search_latency_ms),
        args.temperature,
        Path(args.recorded_dir),
        args.record,
        args.paced_remote,
    )
    if args.mode == "paced" and config.backend.backend:
        raise ValueError(
            "paced mode replays recorded turns and serves them itself: drop --backend (--paced-remote "
            "drives them through the remote backend), or use --mode live with --backend"
        )
    backend = config.backend.backend or ("paced stand-in (--paced-remote)" if args.paced_remote else None)
    baseline = None
    if args.embedded_baseline:
        if backend is None:
            raise ValueError(
                "--embedded-baseline compares a remote run (--backend or --paced-remote) with the "
                "embedded engine"
            )
        embedded = dataclasses.replace(config, backend=dataclasses.replace(config.backend, backend=None))
        rounds = run_workloads(embedded, dataclasses.replace(options, paced_remote=False))
        baseline = _report(args, embedded, rounds, None)
    data = _report(args, config, run_workloads(config, options), backend)
    name = (
        {"paced": "workloads-paced-remote", "live": "workloads-remote"}[args.mode]
        if data["backend"]
        else f"workloads-{args.mode}"
    )
    path = Path(args.json or f"docs/results/{name}.json")
    if args.merge and path.exists():
        data["workloads"] = {**json.loads(path.read_text())["workloads"], **data["workloads"]}
    if baseline is not None:
        add_comparison(data, baseline, "the embedded engine, earlier in this invocation")
        data["baseline"]["run"] = baseline
    elif args.baseline:
        add_comparison(data, json.loads(Path(args.baseline).read_text()), args.baseline)
    write_json(path, data)
    print_table(Console(), data)
    if "baseline" in data:
        print_comparison(Console(), data["baseline"]["workloads"], f"against {data['baseline']['source']}")
    if args.plots:
        _plots(data, Path(args.plots))
    return data


def _report(args: argparse.Namespace, config: EngineConfig, rounds: dict, backend: str | None) -> dict:
    paced = args.mode == "paced"
    extra = {
        "search_latency_ms": args.search_latency_ms,
        "prefill_ms_per_token": args.prefill_ms_per_token if paced else None,
        "model": config.model.model,
        "temperature": None if paced else args.temperature,
        "backend": backend,
        "backend_dialect": config.backend.backend_dialect,
    }
    return report(args.mode, args.token_latency_ms if paced else None, rounds, extra)


def _plots(data: dict, folder: Path) -> None:
    from conveyor.bench.plots import plot_bars, plot_timeline

    mode = data["mode"] + ("-remote" if data["backend"] else "")
    label = (
        f"paced: emulated {data['token_latency_ms']:g} ms/token decode clock"
        if data["mode"] == "paced"
        else "live: default model on this CPU"
    )
    plot_bars(data, label, folder / f"workloads-{mode}-latency.png")
    for name, row in data["workloads"].items():
        plot_timeline(name, row, label, folder / f"workloads-{mode}-timeline-{name}.png")
