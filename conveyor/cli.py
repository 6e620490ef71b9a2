"""`conveyor chat | demo | model | bench`; flags are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import sys

from conveyor.backends import BackendError
from conveyor.config import (
    BackendConfig,
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    ToolConfig,
    add_flags,
    engine_config_from_flags,
    from_flags,
)
from conveyor.core.request import SamplingParams
from conveyor.engine.model.loader import ModelLoadError
from conveyor.tools.builtin import BUILTIN_TOOLS


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ModelConfig, "model")
    add_flags(parser, CacheConfig, "KV cache")
    add_flags(parser, SchedulerConfig, "scheduler")
    add_flags(parser, ToolConfig, "tools", {"tools": BUILTIN_TOOLS})
    add_flags(
        parser, BackendConfig, "remote backend (Conveyor's tool layer in front of vLLM, SGLang, llama.cpp)"
    )


def _chat(args: argparse.Namespace) -> int:
    from conveyor.backends import open_engine

    params = from_flags(SamplingParams, args)
    engine = open_engine(engine_config_from_flags(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    with engine:
        for out in engine.stream(messages, params, tools=list(engine.config.tools.tools)):
            sys.stdout.write(out.new_text)
            for result in out.tool_results:
                sys.stdout.write(f"\n[{result.name} result]\n{result.content}\n")
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from conveyor.bench.overhead import run_overhead_bench

    run_overhead_bench(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from conveyor.bench.demo import run_demo

    run_demo(args)
    return 0


def _model_pull(args: argparse.Namespace) -> int:
    from conveyor.engine.model.loader import pull_model

    print(pull_model(args.name, weights=args.weights))
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from conveyor.bench.engine_bench import run_engine_bench

    run_engine_bench(args)
    return 0


def _bench_intercept(args: argparse.Namespace) -> int:
    from conveyor.bench.intercept import run_intercept_bench

    run_intercept_bench(args)
    return 0


def _bench_calls(args: argparse.Namespace) -> int:
    from conveyor.bench.calls import run_calls_bench

    run_calls_bench(args)
    return 0


def _bench_workloads(args: argparse.Namespace) -> int:
    from conveyor.bench.workloads.command import run_workloads_bench

    run_workloads_bench(args)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from conveyor.server.serve import serve

    serve(engine_config_from_flags(args), from_flags(ServerConfig, args))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from conveyor.bench.serve import run_serve_bench

    run_serve_bench(args)
    return 0


def _bench_agents(args: argparse.Namespace) -> int:
    from conveyor.bench.agents import run_agents_bench

    run_agents_bench(args)
    print(f"wrote {args.json}")
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from conveyor.bench.soak import run_soak

    result = run_soak(args)
    failed = [c["name"] for c in result["verdicts"] if c["pass"] is False]
    if failed:
        print(f"conveyor bench soak: failed: {'; '.join(failed)} (see {args.json})", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor: a tool-aware LLM serving engine")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="stream one chat answer to the terminal")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--system", default="", help="an optional system message")
    _engine_flags(chat)
    add_flags(chat, SamplingParams, "sampling")
    chat.set_defaults(run=_chat)

    demo = commands.add_parser("demo", help="a tool-using request on the default model, partial vs lazy")
    from conveyor.bench.demo import add_demo_flags

    add_demo_flags(demo)
    _engine_flags(demo)
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with server-side tools")
    _engine_flags(serve)
    add_flags(serve, ServerConfig, "server")
    serve.set_defaults(run=_serve)

    model = commands.add_parser("model", help="manage models").add_subparsers(
        dest="model_command", required=True
    )
    pull = model.add_parser("pull", help="install, verify and convert a built-in model")
    pull.add_argument(
        "name", nargs="?", default="default", help="default, qwen2.5-coder-0.5b or smollm2-135m"
    )
    pull.add_argument(
        "--weights",
        choices=["native", "bf16"],
        default="bf16",
        help="bf16: de-quantize it once (what --weights auto runs); native: keep the GGUF as it is",
    )
    pull.set_defaults(run=_model_pull)

    _add_bench(
        commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    )
    return parser


def _add_bench(bench: argparse._SubParsersAction) -> None:
    """The `conveyor bench ...` subcommands."""
    from conveyor.bench.engine_bench import add_engine_bench_flags

    engine = bench.add_parser("engine", help="decode and prefill speed against transformers")
    add_engine_bench_flags(engine)
    _engine_flags(engine)
    engine.set_defaults(run=_bench_engine)

    from conveyor.bench.overhead import add_overhead_flags

    overhead = bench.add_parser(
        "overhead", help="CPU cost of parsing and dispatch, and field-to-hook latency"
    )
    add_overhead_flags(overhead)
    _engine_flags(overhead)
    overhead.set_defaults(run=_bench_overhead)

    calls = bench.add_parser("calls", help="tool-call success rate with and without constrained decoding")
    calls.add_argument("--json", default="docs/results/calls.json", help="where to write the results")
    calls.add_argument("--seeds", type=int, default=2, help="sampled runs per prompt, besides the greedy one")
    calls.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled runs")
    calls.add_argument("--max-tokens", type=int, default=160, help="most tokens per reply")
    calls.add_argument(
        "--modes",
        nargs="+",
        default=["auto", "required", "auto-grammar"],
        choices=["auto", "required", "auto-grammar"],
        help="tool_choice modes to run",
    )
    _engine_flags(calls)
    calls.set_defaults(run=_bench_calls)

    from conveyor.bench.serve import add_serve_bench_flags

    serve = bench.add_parser(
        "serve", help="the HTTP server under load: throughput, TTFT, inter-token latency"
    )
    add_serve_bench_flags(serve)
    serve.set_defaults(run=_bench_serve)

    from conveyor.bench.intercept import add_intercept_flags

    intercept = bench.add_parser(
        "intercept", help="KV policies for requests waiting on tools, under Poisson load"
    )
    add_intercept_flags(intercept)
    intercept.set_defaults(run=_bench_intercept)

    from conveyor.bench.workloads.command import add_workloads_flags

    workloads = bench.add_parser("workloads", help="the six tool workloads, partial vs lazy (paced or live)")
    add_workloads_flags(workloads)
    _engine_flags(workloads)
    workloads.set_defaults(run=_bench_workloads)

    from conveyor.bench.soak import add_soak_flags

    soak = bench.add_parser(
        "soak",
        help="a bounded soak of `conveyor serve`: mixed tool requests, aborts, tool "
        "faults; RSS, FDs, blocks and workers must stay flat",
    )
    add_soak_flags(soak)
    soak.set_defaults(run=_bench_soak)

    from conveyor.bench.agents import add_agents_flags

    agents = bench.add_parser(
        "agents",
        help="multi-turn client-tool programs (BFCL, a coding agent) through the openai client: "
        "--schedule policies against no prefix cache and llama.cpp's server",
    )
    add_agents_flags(agents)
    agents.set_defaults(run=_bench_agents)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ModelLoadError, BackendError) as e:
        print(f"conveyor: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
