"""`conveyor bench agents`: multi-turn client-tool programs (BFCL v4 multi_turn_base and a
synthetic coding agent, `agents_programs.py`) through the official `openai` client against
servers on loopback, with Poisson program arrivals at several rates.

Systems, all up together and run one at a time, interleaved (the order rotates each repeat, so
the machine's other load falls on all alike): Conveyor (`agents_server.py`: `conveyor serve`
with each model turn forced, so every forward pass is real and every run the same) under each
`--schedule`, and with the prefix cache off; llama.cpp's server (xllamacpp) on the same GGUF
weights with its own prompt cache, each turn forced by a GBNF grammar of the same text. The
first system named is the baseline of the ratios (by default `today`: Conveyor without its
session features, prefix cache only). Writes the JSON (every program's and request's record, /metrics KV samples), the
markdown table and two plots beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.bench.agents_client import LoadSpec, Target, run_load
from conveyor.bench.agents_programs import AgentProgram, bfcl_programs, coding_program
from conveyor.bench.agents_report import markdown, plot_jct, plot_kv, summarize
from conveyor.bench.results import provenance, write_json, write_text
from conveyor.bench.serve import free_port, spawn_server, stop_server, wait_healthy

SYSTEMS = {
    "today": "Conveyor as before sessions: --schedule fcfs, prefix cache only, baseline (a)",
    "fcfs": "Conveyor with sessions (exact continuation, session KV), --schedule fcfs",
    "program-fcfs": "Conveyor with sessions, --schedule program-fcfs (Continuum's program order)",
    "las": "Conveyor with sessions, --schedule las (Autellix's least attained service)",
    "no-cache": "Conveyor, --no-prefix-caching, no sessions: every turn recomputed, baseline (b)",
    "llamacpp": "llama.cpp's server (xllamacpp) on the same GGUF, its prompt cache on, baseline (c)",
}


def sessions_served() -> bool:
    """Whether this Conveyor has session features to turn off (exact continuation, session KV)."""
    from conveyor.config import SchedulerConfig, ServerConfig

    return (
        "session_kv" in SchedulerConfig.__dataclass_fields__
        and "exact_continuation" in ServerConfig.__dataclass_fields__
    )


def server_flags(system: str) -> list[str]:
    """The `conveyor serve` flags of a Conveyor system."""
    sessions_off = ["--no-session-kv", "--no-exact-continuation"] if sessions_served() else []
    return {
        "today": ["--schedule", "fcfs", *sessions_off],
        "fcfs": ["--schedule", "fcfs"],
        "program-fcfs": ["--schedule", "program-fcfs"],
        "las": ["--schedule", "las"],
        "no-cache": ["--schedule", "fcfs", "--no-prefix-caching", *sessions_off],
    }[system]


def default_systems() -> list[str]:
    """Every system; without session features `fcfs` is `today` and is left out."""
    return [s for s in SYSTEMS if s != "fcfs" or sessions_served()]


QUICK = {
    "rates": [0.1],
    "num_bfcl": 3,
    "num_coding": 1,
    "coding_turns": 30,
    "coding_growth": 100,
    "repeats": 1,
    "bfcl_called_tools_only": True,
    "systems": [s for s in default_systems() if s != "no-cache"],  # recomputing 30 turns takes too long here
}


def add_agents_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--json",
        default="docs/results/agents.json",
        help="where to write the results (.md and plots beside it)",
    )
    add("--model", default="default", help="model to serve (a built-in name or a GGUF file)")
    add(
        "--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), help="the first is the baseline"
    )
    add("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="program arrival rates (programs/s)")
    add("--num-bfcl", type=int, default=8, help="BFCL multi_turn_base programs per run")
    add("--num-coding", type=int, default=2, help="synthetic coding-agent programs per run")
    add("--coding-turns", type=int, default=32, help="tool calls of a coding program")
    add("--coding-growth", type=int, default=200, help="tokens each coding tool result adds")
    add("--bfcl-called-tools-only", action="store_true", help="offer only the functions a program calls")
    add("--repeats", type=int, default=2, help="runs of each system at each rate, interleaved")
    add("--tool-median-s", type=float, default=1.0, help="median of the lognormal tool latency")
    add("--tool-sigma", type=float, default=0.5, help="sigma of the lognormal tool latency's log")
    add(
        "--timeout-s",
        type=float,
        default=900.0,
        help="a program unfinished this long after the last arrival fails",
    )
    add(
        "--jct-bound-s",
        type=float,
        default=0.0,
        help="the JCT bound of goodput; 0: 1.5x the baseline's p90 at the lowest rate",
    )
    add("--kv-cache-mb", type=int, default=128, help="Conveyor's KV cache (small enough for memory pressure)")
    add("--max-model-len", type=int, default=8192, help="context of every server")
    add("--llamacpp-slots", type=int, default=4, help="llama.cpp's parallel slots (each of --max-model-len)")
    add(
        "--num-threads",
        type=int,
        default=1,
        help="threads of every server (on this shared machine one thread decoded 4x faster than two: a "
        "preempted thread stalls the whole parallel op); 0: the CPUs this process may use",
    )
    add("--seed", type=int, default=0, help="seed of arrivals and tool latencies")
    add("--quick", action="store_true", help=f"a few minutes' run: {QUICK}")


def apply_quick(args: argparse.Namespace) -> None:
    """The quick sizes, except where a flag was given (its value differs from the default)."""
    defaults = argparse.ArgumentParser()
    add_agents_flags(defaults)
    for key, value in QUICK.items():
        if getattr(args, key) == defaults.get_default(key):
            setattr(args, key, value)


def run_agents_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        apply_quick(args)
    console = Console(stderr=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    programs = load_programs(args)
    loadavg_at_start = [round(x, 2) for x in os.getloadavg()]
    with ExitStack() as stack:
        targets = start_systems(args, programs, stack, console)
        runs = run_interleaved(args, targets, programs, console)
    bound, rule = jct_bound(args, runs)
    result = {
        "provenance": provenance(),
        "loadavg_at_start": loadavg_at_start,
        "config": _config(args, programs),
        "systems": {
            s: f"{SYSTEMS[s]} ({' '.join(server_flags(s)) if s != 'llamacpp' else 'grammar-forced'})"
            for s in args.systems
        },
        "jct_bound_s": bound,
        "jct_bound_rule": rule,
        "summary": summarize(runs, args.systems[0], bound),
        "notes": NOTES,
        "runs": runs,
    }
    write_outputs(Path(args.json), result, runs)
    return result


NOTES = (
    "Each model turn is forced (Conveyor: forced-token replay; llama.cpp: a GBNF grammar of the same text), so "
    "all systems compute the same outputs. Follow-up TTFT is taken at the first content or tool-call delta (Conveyor "
    "streams a call's delta once its name is parsed, a few tokens after the first). The repeated prefix of a "
    "follow-up is the previous request's prompt and output tokens as the server counted them. llama.cpp gets the "
    "tool list in its system message (its server takes no custom grammar beside `tools`) and the assistant turns "
    "as their text; its KV memory is its slots' contexts, not Conveyor's --kv-cache-mb."
)


def load_programs(args: argparse.Namespace) -> list[AgentProgram]:
    bfcl = bfcl_programs(args.num_bfcl, args.bfcl_called_tools_only) if args.num_bfcl else []
    coding = [
        coding_program(f"coding_{i}", args.coding_turns, args.coding_growth, seed=i)
        for i in range(args.num_coding)
    ]
    # the coding programs spread among the BFCL ones, in a fixed order
    out: list[AgentProgram] = list(bfcl)
    for i, c in enumerate(coding):
        out.insert(min(len(out), (i + 1) * max(1, len(bfcl) // (len(coding) + 1))), c)
    return out


def start_systems(
    args: argparse.Namespace, programs: list[AgentProgram], stack: ExitStack, console: Console
) -> dict[str, Target]:
    """Every system up (Conveyor's servers load side by side), stopped when `stack` closes."""
    script = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "script.json"
    script.write_text(json.dumps({p.program_id: p.script() for p in programs}))
    threads = args.num_threads or len(os.sched_getaffinity(0))
    spawned = {}
    for system in [s for s in args.systems if s != "llamacpp"]:
        port = free_port()
        cmd = [sys.executable, "-m", "conveyor.bench.agents_server", str(script), "--model", args.model]
        cmd += ["--port", str(port), "--served-model-name", "bench", "--kv-cache-mb", str(args.kv_cache_mb)]
        cmd += ["--max-model-len", str(args.max_model_len), "--num-threads", str(threads)]
        cmd += ["--max-pending", "1024", *server_flags(system)]
        console.print(f"[agents] starting {system}: {' '.join(cmd[3:])}")
        server = spawn_server(cmd)
        stack.callback(stop_server, server)
        spawned[system] = (server, f"http://127.0.0.1:{port}")
    targets = {}
    for system in args.systems:
        if system == "llamacpp":
            targets[system] = _start_llamacpp(args, threads, stack)
        else:
            server, url = spawned[system]
            wait_healthy(server, url, system)
            targets[system] = Target(system, url, "conveyor")
    return targets


def _start_llamacpp(args: argparse.Namespace, threads: int, stack: ExitStack) -> Target:
    from conveyor.bench.llamacpp_peer import llama_server
    from conveyor.engine.model.loader import resolve_model

    gguf = resolve_model(args.model, progress=False, weights="native") / "model.gguf"
    url, _ = stack.enter_context(llama_server(gguf, threads, args.llamacpp_slots, args.max_model_len))
    return Target("llamacpp", url, "llamacpp", inline_tools=_template_shows_tools(gguf.parent))


def _template_shows_tools(model_dir: Path) -> bool:
    """Whether the model's chat template lists `tools` (Qwen2.5's does, SmolLM2's does not): only
    then does llama.cpp get the tool list in its system message, so both prompts carry it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "probe_tool", "parameters": {"type": "object"}}}
    return "probe_tool" in tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False)


def run_interleaved(
    args: argparse.Namespace, targets: dict[str, Target], programs: list[AgentProgram], console: Console
) -> list[dict[str, Any]]:
    runs = []
    for rate in args.rates:
        for repeat in range(args.repeats):
            order = args.systems[repeat % len(args.systems) :] + args.systems[: repeat % len(args.systems)]
            for system in order:
                spec = LoadSpec(rate, args.tool_median_s, args.tool_sigma, args.timeout_s, args.seed + repeat)
                before = [round(x, 2) for x in os.getloadavg()]
                run = asyncio.run(run_load(targets[system], programs, spec))
                run |= {
                    "system": system,
                    "rate": rate,
                    "repeat": repeat,
                    "loadavg_before": before,
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                }
                failed = sum(1 for p in run["programs"] if p["error"])
                console.print(
                    f"[agents] {system} at {rate}/s, repeat {repeat}: {run['wall_s']:.0f} s, {failed} failed, load {run['loadavg_after']}"
                )
                runs.append(run)
    return runs


def jct_bound(args: argparse.Namespace, runs: list[dict[str, Any]]) -> tuple[float, str]:
    if args.jct_bound_s:
        return args.jct_bound_s, "given"
    low = min(args.rates)
    base = [
        p["jct_s"]
        for r in runs
        if r["system"] == args.systems[0] and r["rate"] == low
        for p in r["programs"]
        if not p["error"]
    ]
    if not base:
        return float("inf"), "no baseline program completed: unbounded"
    base.sort()
    return 1.5 * base[
        min(len(base) - 1, round(0.9 * (len(base) - 1)))
    ], f"1.5x {args.systems[0]}'s p90 at {low}/s"


def _config(args: argparse.Namespace, programs: list[AgentProgram]) -> dict[str, Any]:
    kinds = {k: [p for p in programs if p.kind == k] for k in ("bfcl", "coding")}
    summary = ", ".join(
        f"{len(v)} {k} ({sum(p.num_requests for p in v)} requests)" for k, v in kinds.items() if v
    )
    return {
        **{
            k: getattr(args, k)
            for k in (
                "model",
                "rates",
                "repeats",
                "tool_median_s",
                "tool_sigma",
                "kv_cache_mb",
                "max_model_len",
                "coding_turns",
                "coding_growth",
                "bfcl_called_tools_only",
                "quick",
            )
        },
        "programs_summary": summary,
        "programs": [
            {"id": p.program_id, "kind": p.kind, "requests": p.num_requests, "tools": len(p.tools)}
            for p in programs
        ],
    }


def write_outputs(path: Path, result: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    write_text(path.with_suffix(".md"), markdown(result))
    plot_kv(runs, path.with_name(path.stem + "_kv.png"))
    plot_jct(result["summary"], result["config"]["rates"], path.with_name(path.stem + "_jct.png"))
