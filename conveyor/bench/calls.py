"""`conveyor bench calls`: tool-call success with and without constrained decoding.

Twelve prompts (four each for search, sql and calculator) are rendered by the chat
template with all three tools; each runs greedy and with `--seeds` seeds at
`--temperature`, in every mode:
- "auto": tool_choice auto, unconstrained (the baseline);
- "required": the grammar forces one or more calls of the given tools;
- "auto-grammar": free text, but a call that starts with `<tool_call>` is constrained.
A run succeeds when the hermes parser (`<tool_call>`, bare JSON, ```json fences) finds a
call of the expected tool whose arguments validate against its schema. The grammar's
costs are measured in the same run: building the tokenizer's tables, compiling each
choice, and the per-token mask (fill plus apply, replayed over the constrained replies).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch
from rich.console import Console
from rich.table import Table

from conveyor.bench.results import write_json
from conveyor.config import engine_config_from_flags
from conveyor.core.request import SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.tools.base import FunctionTool
from conveyor.tools.grammar import ToolGrammar
from conveyor.tools.parsers import CallEnd, CallStart, make_parser

MODES = {"auto": None, "required": "required", "auto-grammar": "auto"}  # mode -> grammar choice
OUTCOMES = ("ok", "no call", "unknown tool", "wrong tool", "bad arguments")
TABLE = (
    "The database has one table: employees(id INTEGER PRIMARY KEY, name TEXT, department TEXT, "
    "salary REAL, hired_on DATE)."
)
PROMPTS = {
    "search": [
        "What is the latest news about the James Webb Space Telescope?",
        "Find recent reviews of the Framework 16 laptop.",
        "Who won the most recent Tour de France?",
        "Look up the current population of Lagos, Nigeria.",
    ],
    "sql": [
        f"{TABLE} How many employees work in the Sales department?",
        f"{TABLE} What is the average salary in each department?",
        f"{TABLE} List the five most recently hired employees.",
        f"{TABLE} Which employees earn more than 100000?",
    ],
    "calculator": [
        "What is 48271 * 9133?",
        "Compute (1234.5 - 78.25) / 3.5.",
        "What is 2 to the power of 37?",
        "How much is 17% of 8420?",
    ],
}


def search(query: str, k: int = 3) -> str:
    """Search the web and return the top results.

    Args:
        query: what to search for
        k: how many results to return
    """
    raise NotImplementedError


def sql(query: str) -> str:
    """Run one SQLite query against the company database and return the rows.

    Args:
        query: a single SQL statement
    """
    raise NotImplementedError


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: the expression, e.g. (3 + 4) * 2
    """
    raise NotImplementedError


TOOLS = {fn.__name__: FunctionTool(fn) for fn in (search, sql, calculator)}


def score(reply: str, tool: str) -> str:
    """One of OUTCOMES: "ok" when some call of `tool` has schema-valid arguments."""
    parser = make_parser("hermes")
    events = parser.feed(reply) + parser.close()
    names = {e.index: e.name for e in events if isinstance(e, CallStart)}
    calls = [(names.get(e.index), e.args) for e in events if isinstance(e, CallEnd)]
    if not calls:
        return "no call"
    args = [a for name, a in calls if name == tool]
    if not args:
        return "wrong tool" if any(name in TOOLS for name, _ in calls) else "unknown tool"
    validator = jsonschema.Draft202012Validator(TOOLS[tool].parameters)
    return "ok" if any(isinstance(a, dict) and validator.is_valid(a) for a in args) else "bad arguments"


def workload(num_seeds: int, temperature: float, max_tokens: int) -> list[tuple[str, int, SamplingParams]]:
    """(tool, prompt index, sampling) of every run in one mode: greedy, then the seeds."""
    samplings = [SamplingParams(max_tokens=max_tokens)] + [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s) for s in range(num_seeds)
    ]
    return [(tool, i, p) for tool, prompts in PROMPTS.items() for i in range(len(prompts)) for p in samplings]


def run_mode(engine: LLMEngine, grammar: ToolGrammar, mode: str, runs: list) -> dict[str, Any]:
    """Run every (tool, prompt, sampling) at once in `mode`; returns its records and speed."""
    specs = [t.spec() for t in TOOLS.values()]
    ids = []
    for tool, i, params in runs:
        prompt = engine.encode([{"role": "user", "content": PROMPTS[tool][i]}], tools=specs)
        ids.append(engine.add_request(prompt, params, constraint=grammar.constraint(specs, MODES[mode])))
    requests = [engine.get_request(r) for r in ids]
    start = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    wall_s = time.perf_counter() - start
    records = []
    for (tool, i, params), r in zip(runs, requests):
        reply = engine.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
        records.append(
            {
                "tool": tool,
                "prompt": i,
                "seed": params.seed,
                "outcome": score(reply, tool),
                "num_tokens": len(r.output_token_ids),
                "tokens": r.output_token_ids,
                "reply": reply,
            }
        )
    num_tokens = sum(rec["num_tokens"] for rec in records)
    return {
        "mode": mode,
        "constrained": MODES[mode] is not None,
        "wall_s": wall_s,
        "tok_s": num_tokens / wall_s,
        "records": records,
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Success rate overall and per tool, and the count of each outcome."""
    records = result["records"]
    per_tool = {t: sum(r["outcome"] == "ok" for r in records if r["tool"] == t) for t in PROMPTS}
    outcomes = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    return {
        "mode": result["mode"],
        "constrained": result["constrained"],
        "runs": len(records),
        "success": outcomes["ok"],
        "success_rate": outcomes["ok"] / len(records),
        "per_tool_ok": per_tool,
        "outcomes": outcomes,
        "mean_tokens": statistics.mean(r["num_tokens"] for r in records),
        "tok_s": result["tok_s"],
        "wall_s": result["wall_s"],
    }


def compile_costs(engine: LLMEngine) -> tuple[ToolGrammar, dict[str, Any]]:
    """A fresh ToolGrammar, and what building it and compiling each choice took."""
    start = time.perf_counter()
    grammar = ToolGrammar(engine.tokenizer, engine.runner.args.vocab_size, engine.eos_token_ids)
    costs: dict[str, Any] = {"tokenizer_info_s": time.perf_counter() - start, "compile_s": {}}
    specs = [t.spec() for t in TOOLS.values()]
    named = {"type": "function", "function": {"name": "search"}}
    for label, choice in (("auto", "auto"), ("required", "required"), ("named", named)):
        start = time.perf_counter()
        grammar.compiled(specs, choice)
        costs["compile_s"][label] = time.perf_counter() - start
    start = time.perf_counter()
    grammar.constraint(specs, "required")
    costs["cached_constraint_us"] = (time.perf_counter() - start) * 1e6
    return grammar, costs


def mask_costs(engine: LLMEngine, grammar: ToolGrammar, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-token mask time, replaying the constrained replies through the sampler's GrammarMask
    on one row of float32 logits: `fill` alone, and `fill + apply` as a masked step does it."""
    import xgrammar as xgr

    from conveyor.engine.sampler import GrammarMask

    specs = [t.spec() for t in TOOLS.values()]
    vocab = engine.runner.args.vocab_size
    bitmask, logits, mask = xgr.allocate_token_bitmask(1, vocab), torch.randn(1, vocab), GrammarMask()
    fill: list[float] = []
    total: list[float] = []
    for result in (r for r in results if r["constrained"]):
        for record in result["records"]:
            constraint = grammar.constraint(specs, MODES[result["mode"]])
            for token in record["tokens"]:
                if not constraint.active:
                    break
                t0 = time.perf_counter()
                constraint.fill_mask(bitmask, 0)
                t1 = time.perf_counter()
                mask.apply(logits, [0], [constraint])
                fill.append(t1 - t0)
                total.append(time.perf_counter() - t1)
                constraint.accept(token)
    return {
        "num_tokens": len(total),
        "fill_p50_us": _percentile_us(fill, 50),
        "fill_apply_p50_us": _percentile_us(total, 50),
        "fill_apply_p99_us": _percentile_us(total, 99),
    }


def _percentile_us(times_s: list[float], pct: int) -> float | None:
    if len(times_s) < 2:
        return None
    return statistics.quantiles(times_s, n=100, method="inclusive")[pct - 1] * 1e6


def run_calls_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark: compile costs, every mode's runs, mask costs; prints and writes JSON."""
    console = Console(width=None if sys.stdout.isatty() else 150)
    engine = LLMEngine(engine_config_from_flags(args))
    grammar, costs = compile_costs(engine)
    runs = workload(args.seeds, args.temperature, args.max_tokens)
    results = []
    for mode in args.modes:
        with console.status(f"{mode}: {len(runs)} runs"):
            results.append(run_mode(engine, grammar, mode, runs))
    costs["mask"] = mask_costs(engine, grammar, results)
    result = {
        "model": args.model,
        "device": str(engine.runner.device),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "seeds": args.seeds,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "grammar": costs,
        "modes": [summarize(r) for r in results],
        "runs": {r["mode"]: [_without_tokens(rec) for rec in r["records"]] for r in results},
    }
    _report(console, result)
    write_json(Path(args.json), result, indent=2)
    console.print(f"wrote {args.json}")
    return result


def _without_tokens(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "tokens"}


def _report(console: Console, result: dict[str, Any]) -> None:
    table = Table(
        title=f"tool-call success, {result['model']} ({result['modes'][0]['runs']} runs per mode: "
        f"greedy + {result['seeds']} seeds at temperature {result['temperature']})"
    )
    for col in (
        "mode",
        "grammar",
        "success",
        *PROMPTS,
        "no call",
        "unknown tool",
        "wrong tool",
        "bad args",
        "tokens/reply",
        "wall s",
    ):
        table.add_column(col, justify="right")
    for m in result["modes"]:
        per_tool = [f"{m['per_tool_ok'][t]}/{m['runs'] // len(PROMPTS)}" for t in PROMPTS]
        outcomes = [str(m["outcomes"][o]) for o in OUTCOMES[1:]]
        table.add_row(
            m["mode"],
            "yes" if m["constrained"] else "no",
            f"{m['success']}/{m['runs']} ({m['success_rate']:.0%})",
            *per_tool,
            *outcomes,
            f"{m['mean_tokens']:.0f}",
            f"{m['wall_s']:.0f}",
        )
    console.print(table)
    g, mask = result["grammar"], result["grammar"]["mask"]
    compiles = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in g["compile_s"].items())
    console.print(
        f"grammar: tokenizer tables {g['tokenizer_info_s']:.2f} s once; compile {compiles}; "
        f"cached lookup {g['cached_constraint_us']:.0f} us"
    )
    if mask["num_tokens"] > 1:
        console.print(
            f"mask per token over {mask['num_tokens']} tokens: fill p50 {mask['fill_p50_us']:.1f} us; "
            f"fill + apply p50 {mask['fill_apply_p50_us']:.1f} us, p99 {mask['fill_apply_p99_us']:.1f} us"
        )
