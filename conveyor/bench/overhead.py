"""`conveyor bench overhead`: what partial execution costs per decoded token.

1. Live: the default model at batch 1 (the shortest step, so the largest share) decodes
   a Python program for the `python` tool, a JSON call (constrained to the schema of a probe
   tool with several fields) and an LLMCompiler plan, in partial mode. Measured: the decode
   step time, and for every field or line the delay from the parser emitting it to the
   tool's hook running in its worker (under real contention with the forward pass).
   Also measured live: the sampler's time on constraints per constrained token (the grammar's
   accept check, and the mask and redraw where the grammar refused the unmasked token), and
   the workers' hand-off waits (the engine's thread sleeping until a worker took new work).
2. Replay: the same text deltas, fed again through fresh turns on the same executor and
   workers, timed with the feeding thread's CPU clock: parsing + dispatch per token.
Share = (parse + dispatch [+ constraint time per constrained token] [+ hand-off wait per
token]) / decode step time: this CPU's step, and a 20 ms step (a GPU-class step, the paced
workloads' clock), where the same cost is a larger share.
3. A/B: one JSON call request in partial mode, in lazy mode, and the same messages without
   tools, `--ab-repeats` times each, interleaved (the order rotating): the whole step's time
   (median of each request's decode steps), which also holds what the replay does not see
   (the workers' CPU, the hand-off).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from conveyor.bench.demo import SYSTEM, TASK
from conveyor.bench.results import provenance, write_json
from conveyor.tools.base import Tool
from conveyor.tools.parsers import default_format

PLAN_SYSTEM = (
    'Plan with numbered steps, one call per line, like:\n1. probe("a", 1)\n2. probe("$1", 2)\n'
    "Then write <END_OF_PLAN>."
)


class Probe(Tool):
    """A tool that does nothing: its hooks only mark when they ran."""

    name = "probe"
    side_effects = "none"
    description = "Record a city's weather observation."
    parameters = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "country", "temperature_c", "conditions", "notes"],
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "temperature_c": {"type": "number"},
            "conditions": {"type": "string"},
            "notes": {"type": "string"},
        },
    }

    def finish(self, args: dict[str, Any]) -> Any:
        return "recorded"


WEATHER = [
    ("Lyon, France", "14.5 C, light rain, wind from the west"),
    ("Oslo, Norway", "-3 C, snow"),
    ("Cairo, Egypt", "31 C, clear sky"),
    ("Lima, Peru", "18 C, overcast, drizzle in the morning"),
    ("Osaka, Japan", "22.5 C, humid, scattered clouds"),
    ("Perth, Australia", "27 C, strong sea breeze"),
    ("Quebec, Canada", "-11 C, freezing fog"),
    ("Nairobi, Kenya", "24 C, afternoon thunderstorms"),
]


def bench_requests(num_json: int) -> list[tuple[str, list[dict], dict]]:
    """(name, messages, add_request options): the python program, `num_json` JSON calls, the plan."""
    json_calls = [
        (
            f"json{i}",
            [{"role": "user", "content": f"Record today's weather in {city}: {obs}."}],
            {"tools": ["probe"], "tool_choice": "required", "max_tool_rounds": 1},
        )
        for i, (city, obs) in enumerate(WEATHER[j % len(WEATHER)] for j in range(num_json))
    ]
    return [
        (
            "python",
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}],
            {"tools": ["python"], "call_format": "python", "max_tool_rounds": 1},
        ),
        *json_calls,
        (
            "plan",
            [
                {"role": "system", "content": PLAN_SYSTEM},
                {"role": "user", "content": "Record the weather of five French cities, one step each."},
            ],
            {"tools": ["probe"], "call_format": "plan", "max_tool_rounds": 1},
        ),
    ]


def run_overhead_bench(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor.config import engine_config_from_flags
    from conveyor.engine.engine import LLMEngine

    config = engine_config_from_flags(args)
    tools = dataclasses.replace(
        config.tools, tools=("python", "conveyor.bench.overhead:Probe"), tool_mode="partial"
    )
    console = Console()
    with LLMEngine(dataclasses.replace(config, tools=tools)) as engine:
        _warm_workers(engine)
        todo = bench_requests(args.json_requests)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("live requests", total=len(todo))
            live = {}
            for name, messages, options in todo:
                live[name] = _live(engine, messages, options, args.max_tokens)
                progress.advance(task)
        replay = {name: _replay(engine, run, options) for (name, _, options), run in zip(todo, live.values())}
        ab = _ab_steps(engine, args.ab_repeats, args.ab_tokens)
    report = _summarise(live, replay) | {"ab_step_ms": ab, **provenance()}
    write_json(Path(args.json), report, indent=2)
    _print(console, report)
    return report


def _live(engine, messages: list[dict], options: dict, max_tokens: int) -> dict[str, Any]:
    """One request at batch 1: its first turn's text deltas, decode step times, hook delays."""
    engine.add_request(messages, {"max_tokens": max_tokens, "temperature": 0.0}, **options)
    deltas, steps_s, delays, first_turn = [], [], [], True
    stats, pool = engine.runner.sampler.constraint_stats, engine.driver.executor.pool
    constrained0, handoff0 = dataclasses.replace(stats), pool.handoff_s
    while engine.has_unfinished:
        t0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - t0
        if any(o.new_token_ids for o in outs):
            steps_s.append(elapsed)
        for out in outs:
            if out.tool_results:
                first_turn = False
                delays += _delays(out.tool_results)
            elif first_turn:
                deltas.append(out.new_text)
    return {
        "deltas": deltas,
        "steps_s": steps_s[1:],
        "hook_delays_s": delays,
        "handoff_s": pool.handoff_s - handoff0,
        "constrained": {
            "num_tokens": stats.num_tokens - constrained0.num_tokens,
            "num_refused": stats.num_refused - constrained0.num_refused,
            "num_masked": stats.num_masked - constrained0.num_masked,
            "seconds": stats.seconds - constrained0.seconds,
        },
    }


def _warm_workers(engine) -> None:
    """One probe call per worker first, so the numbers are of warm workers, not of first imports."""
    executor = engine.driver.executor
    turns = [
        executor.open_turn(f"warm{i}", 0, tools=["probe"]) for i in range(engine.config.tools.num_workers)
    ]
    call = (
        '<tool_call>\n{"name": "probe", "arguments": {"city": "a", "country": "b", "temperature_c": 1, '
        '"conditions": "c", "notes": "d"}}\n</tool_call>'
    )
    for turn in turns:
        turn.feed(call)
        turn.end(clean=True)
    deadline = time.perf_counter() + 60
    while not all(t.done for t in turns) and time.perf_counter() < deadline:
        executor.poll(0.1)


def _replay(engine, run: dict[str, Any], options: dict) -> dict[str, Any]:
    """Feed the recorded deltas through a fresh turn; CPU time of parse + dispatch."""
    loop = engine.driver
    parser = options.get("call_format") or default_format(options["tools"])
    turn = loop.executor.open_turn("replay", 0, tools=options["tools"], parser=parser)
    cpu_s = 0.0
    for delta in run["deltas"]:
        t0 = time.thread_time()
        turn.feed(delta)
        loop.executor.poll(0.0)
        cpu_s += time.thread_time() - t0
    turn.end(clean=True)
    deadline = time.perf_counter() + 60
    while not turn.done and time.perf_counter() < deadline:
        loop.executor.poll(0.1)
    delays = _delays(turn.results())
    return {
        "num_tokens": len(run["deltas"]),
        "cpu_s": cpu_s,
        "hook_delays_s": delays,
        "num_calls": len(turn.calls),
    }


AB_ARMS = ("partial", "lazy", "no tools")


def _ab_steps(engine, repeats: int, max_tokens: int) -> dict[str, Any]:
    """Median decode-step time of the same request per arm, the arms interleaved (see the docstring)."""
    messages = [{"role": "user", "content": f"Record today's weather in {WEATHER[0][0]}: {WEATHER[0][1]}."}]
    medians: dict[str, list[float]] = {arm: [] for arm in AB_ARMS}
    for repeat in range(repeats):
        for arm in AB_ARMS[repeat % 3 :] + AB_ARMS[: repeat % 3]:
            options = (
                {}
                if arm == "no tools"
                else {"tools": ["probe"], "tool_choice": "required", "tool_mode": arm, "max_tool_rounds": 1}
            )
            medians[arm].append(statistics.median(_step_times(engine, messages, options, max_tokens)) * 1e3)
    base = statistics.median(medians["no tools"])
    return {
        "per_repeat": medians,
        "median": {arm: statistics.median(v) for arm, v in medians.items()},
        "over_no_tools_us": {arm: (statistics.median(v) - base) * 1e3 for arm, v in medians.items()},
        "max_tokens": max_tokens,
    }


def _step_times(engine, messages: list[dict], options: dict, max_tokens: int) -> list[float]:
    """The times of one request's decode steps (not its first step, nor the one after tool results)."""
    engine.add_request(
        messages, {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}, **options
    )
    steps, first, resumed = [], True, False
    while engine.has_unfinished:
        t0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - t0
        if any(o.new_token_ids for o in outs):
            if not first and not resumed:
                steps.append(elapsed)
            first, resumed = False, any(o.tool_results for o in outs)
    return steps


def _delays(results) -> list[tuple[float, float]]:
    """(delay, of it queued behind the call's earlier hooks) of every field/line hook."""
    return [(d, q) for r in results for d, q in zip(r.hook_delays_s, r.hook_queued_s, strict=True)]


def _latency_ms(delays: list[tuple[float, float]]) -> dict[str, float]:
    """Percentiles of the dispatch latency (delay less queueing) and of the whole delay."""
    dispatch, whole = [d - q for d, q in delays], [d for d, _ in delays]
    return {
        "n": len(delays),
        "p50": _pct(dispatch, 0.5) * 1e3,
        "p99": _pct(dispatch, 0.99) * 1e3,
        "max": max(dispatch, default=float("nan")) * 1e3,
        "num_queued": sum(q > 0 for _, q in delays),
        "with_queueing_p50": _pct(whole, 0.5) * 1e3,
        "with_queueing_p99": _pct(whole, 0.99) * 1e3,
    }


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _summarise(live: dict, replay: dict) -> dict[str, Any]:
    step_s = statistics.median([s for run in live.values() for s in run["steps_s"]])
    per_token = {
        kind: sum(r["cpu_s"] for r in runs) / max(sum(r["num_tokens"] for r in runs), 1)
        for kind, runs in _by_kind(replay).items()
    }
    worst = max(per_token.values())
    constrained = {
        k: sum(run["constrained"][k] for run in live.values())
        for k in ("num_tokens", "num_refused", "num_masked", "seconds")
    }
    constraint_s = constrained["seconds"] / max(constrained["num_tokens"], 1)
    num_tokens = sum(len(run["steps_s"]) + 1 for run in live.values())
    handoff_s = sum(run["handoff_s"] for run in live.values()) / num_tokens
    live_delays = [d for run in live.values() for d in run["hook_delays_s"]]
    replay_delays = [d for r in replay.values() for d in r["hook_delays_s"]]
    cost_s = worst + constraint_s
    return {
        "decode_step_ms_batch1": step_s * 1e3,
        "share_of_20ms_step_pct": {
            "parse_dispatch_worst": worst / 0.02 * 100,
            "parse_dispatch_plus_constraint": cost_s / 0.02 * 100,
            "plus_handoff_wait": (cost_s + handoff_s) / 0.02 * 100,
        },
        "parse_dispatch_constraint_us_per_token": cost_s * 1e6,
        "parse_dispatch_us_per_token": {k: v * 1e6 for k, v in per_token.items()},
        "constraint_us_per_constrained_token": constraint_s * 1e6,
        "constrained_tokens": constrained,
        "handoff_wait_us_per_token": handoff_s * 1e6,
        "share_of_step_pct": {
            "parse_dispatch_worst": worst / step_s * 100,
            "parse_dispatch_plus_constraint": (worst + constraint_s) / step_s * 100,
            "plus_handoff_wait": (worst + constraint_s + handoff_s) / step_s * 100,
        },
        "hook_latency_ms": {"live": _latency_ms(live_delays), "replay": _latency_ms(replay_delays)},
        "live_dispatch_ms": sorted(round((d - q) * 1e3, 3) for d, q in live_delays),
        "num_calls": {kind: sum(r["num_calls"] for r in runs) for kind, runs in _by_kind(replay).items()},
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "goals": {"share_pct_max": 0.5, "hook_p99_ms_max": 1.0, "parse_dispatch_constraint_us_max": 100.0},
    }


def _by_kind(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Runs grouped by kind: "json3" is a "json" run."""
    kinds: dict[str, list[dict]] = {}
    for name, run in runs.items():
        kinds.setdefault(name.rstrip("0123456789"), []).append(run)
    return kinds


def _print(console: Console, report: dict[str, Any]) -> None:
    table = Table(
        title=f"tool-layer overhead (decode step {report['decode_step_ms_batch1']:.1f} ms at batch 1)"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, us in report["parse_dispatch_us_per_token"].items():
        table.add_row(f"parse + dispatch per token, {name}", f"{us:.1f} µs")
    c = report["constrained_tokens"]
    table.add_row(
        f"constraint per constrained token ({c['num_refused']} of {c['num_tokens']} refused, "
        f"{c['num_masked']} masked)",
        f"{report['constraint_us_per_constrained_token']:.1f} µs",
    )
    table.add_row("hand-off wait per token (all tokens)", f"{report['handoff_wait_us_per_token']:.1f} µs")
    for name, pct in report["share_of_step_pct"].items():
        table.add_row(f"share of a decode step, {name}", f"{pct:.3f} %")
    for name, pct in report["share_of_20ms_step_pct"].items():
        table.add_row(f"share of a 20 ms step, {name}", f"{pct:.3f} %")
    for arm, ms in report["ab_step_ms"]["median"].items():
        table.add_row(
            f"A/B whole decode step, {arm} (median of {len(report['ab_step_ms']['per_repeat'][arm])})",
            f"{ms:.2f} ms",
        )
    for phase, lat in report["hook_latency_ms"].items():
        table.add_row(
            f"field/line -> hook, {phase} (n={lat['n']}), dispatch",
            f"p50 {lat['p50']:.3f} / p99 {lat['p99']:.3f} ms",
        )
        table.add_row(
            f"  with queueing behind earlier hooks ({lat['num_queued']} queued)",
            f"p50 {lat['with_queueing_p50']:.3f} / p99 {lat['with_queueing_p99']:.3f} ms",
        )
    console.print(table)


def add_overhead_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="docs/results/overhead.json", help="where to write the results")
    parser.add_argument(
        "--json-requests",
        type=int,
        default=20,
        help="JSON calls to a 5-field probe tool (5 field hooks each: the latency samples)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=700, help="tokens per request (the python program needs ~600)"
    )
    parser.add_argument(
        "--ab-repeats", type=int, default=3, help="A/B of step time: requests per arm, interleaved"
    )
    parser.add_argument("--ab-tokens", type=int, default=64, help="A/B of step time: tokens per request")
