"""`conveyor demo`: one tool-using request on the default model, in partial and lazy mode.

The model writes a Python program; the `python` tool runs it. In partial mode each
statement runs as soon as it is decoded, so the program's work overlaps decoding; in lazy
mode (today's servers) it starts when the call is complete. Prints the answer, both
timelines and the time saved. Greedy decoding: both modes decode the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from conveyor.tools.driver import Span

SYSTEM = (
    "You can run Python. To do so, write one complete program in a single ```python block; it is "
    "executed and you will see its output. After the output, state the final answer in one sentence."
)
TASK = (
    "Using only the standard library: count the prime numbers below 2,000,000 with a sieve and print the "
    "count; then estimate pi with a Monte Carlo simulation of 1,000,000 random points (random.seed(0)) and "
    "print the estimate."
)


@dataclass(slots=True)
class DemoRun:
    mode: str
    latency_s: float
    text: str
    results: list[str]
    timeline: list[Span]
    num_tokens: int


def run_demo(args: argparse.Namespace) -> list[DemoRun]:
    """Run the task once per mode on one engine; print answer, timelines and time saved."""
    from conveyor.backends import open_engine
    from conveyor.config import engine_config_from_flags

    config = engine_config_from_flags(args)
    config = dataclasses.replace(config, tools=dataclasses.replace(config.tools, tools=("python",)))
    console = Console()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": args.task}]
    runs = []
    with open_engine(config) as engine:
        # warm up: both modes then find the prompt's KV cached
        engine.generate([messages], {"max_tokens": 1})
        for mode in ("partial", "lazy"):
            console.print(f"[bold]{mode} mode[/bold]: decoding...")
            runs.append(_run_once(engine, messages, mode, args.max_tokens))
    _report(console, runs)
    return runs


def _run_once(engine, messages: list[dict], mode: str, max_tokens: int) -> DemoRun:
    start = time.perf_counter()
    rid = engine.add_request(
        messages,
        {"max_tokens": max_tokens, "temperature": 0.0},
        tools=["python"],
        tool_mode=mode,
        call_format="python",
    )
    text, results, timeline, num_tokens = [], [], [], 0
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id != rid:
                continue
            text.append(out.new_text)
            results += [r.content for r in out.tool_results]
            num_tokens = out.num_output_tokens
            if out.finished:
                timeline = out.timeline or []
    latency = time.perf_counter() - start
    spans = [Span(s.kind, s.start - start, s.end - start) for s in timeline]
    return DemoRun(mode, latency, "".join(text), results, spans, num_tokens)


def _report(console: Console, runs: list[DemoRun]) -> None:
    partial, lazy = runs
    console.rule("answer (partial mode)")
    console.print(partial.text, markup=False, highlight=False)
    console.rule("tool output")
    shown = "\n---\n".join(r if len(r) < 2000 else r[:2000] + " [...]" for r in partial.results)
    console.print(shown or "(no tool call)", markup=False, highlight=False)
    table = Table(title="timeline, seconds from the request's arrival")
    for column in ("mode", "span", "start", "end", "length"):
        table.add_column(column)
    for run in runs:
        for span in run.timeline:
            table.add_row(
                run.mode, span.kind, f"{span.start:.2f}", f"{span.end:.2f}", f"{span.end - span.start:.2f}"
            )
    console.print(table)
    for run in runs:
        console.print(
            f"{run.mode:>8}: {_bar(run.timeline, max(lazy.latency_s, partial.latency_s))}  "
            f"{run.latency_s:.2f} s, {run.num_tokens} tokens"
        )
    console.print(
        "          [green]=[/green] decode  [yellow]#[/yellow] tool running  . waiting for the tool"
    )
    saved = lazy.latency_s - partial.latency_s
    same = partial.results == lazy.results
    console.print(
        f"[bold]time saved by partial execution: {saved:.2f} s ({saved / lazy.latency_s:.1%} of "
        f"{lazy.latency_s:.2f} s)[/bold]; same tool output in both modes: {same}"
    )
    if not same:
        console.print(f"lazy-mode tool output: {lazy.results}", markup=False, highlight=False)
    console.print(
        "On a CPU-only machine the tool's work and decoding share the cores: partial execution "
        "saves time when the tool waits (I/O, network, a GPU decoding) or spare cores exist."
    )


def _bar(spans: list[Span], total_s: float, width: int = 60) -> str:
    cells = [" "] * width
    marks = {"decode": "[green]=[/green]", "wait": "."}
    for span in sorted(spans, key=lambda s: s.kind.startswith("tool")):
        mark = marks.get(span.kind, "[yellow]#[/yellow]")
        for i in range(int(span.start / total_s * width), min(width, int(span.end / total_s * width) + 1)):
            cells[i] = mark
    return "|" + "".join(cells) + "|"


def add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=TASK, help="what to ask the model")
    parser.add_argument("--max-tokens", type=int, default=600, help="most tokens the model may write in all")
