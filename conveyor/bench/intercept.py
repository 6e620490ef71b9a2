"""`conveyor bench intercept`: the intercept policies under load (Poisson arrivals, tool calls).

Each request has a prompt and several decode segments; after each but the last it calls a
tool: the benchmark pauses it (`LLMEngine.pause_for_tool`) and resumes it with the tool's
result tokens once the sampled tool time has passed on the wall clock. Tool kinds and their
time shapes follow the InferCept workload mix (math, QA, virtual environment, chatbot, image,
TTS), scaled by ``--time-scale``. The engine runs for real; the KV pool is small so that
memory is short and the policies differ. Every policy runs the same requests at each rate and
seed, all with prefix caching (as today's servers run), and ``new-request-no-cache`` is the
new-request baseline without it (the earlier, weaker baseline). The policies are interleaved:
one engine each, all loaded and warmed up alike, taking turns run by run, the order rotating.
``auto`` learns tool times from a running mean of past calls (``--declared-times`` gives it
each kind's true mean instead).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.progress import Progress

from conveyor.bench.results import provenance
from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from conveyor.core.request import SamplingParams
from conveyor.engine.engine import LLMEngine

# bench policy -> (the engine's --intercept, prefix caching)
VARIANTS = {
    "preserve": ("preserve", True),
    "discard": ("discard", True),
    "swap": ("swap", True),
    "auto": ("auto", True),
    "new-request": ("new-request", True),
    "new-request-no-cache": ("new-request", False),
}


@dataclass(frozen=True, slots=True)
class ToolShape:
    """One tool kind: time mean and spread (s), calls per request, result tokens."""

    name: str
    mean_s: float
    std_s: float
    num_calls: float
    num_result_tokens: int


# InferCept (ICML 2024) section 3, Table 1, as we read it (see docs/results/intercept.md)
MIX = (
    ToolShape("math", 9e-5, 2e-4, 3.75, 28),
    ToolShape("qa", 0.72, 0.30, 2.52, 7),
    ToolShape("ve", 0.09, 0.10, 28.18, 19),
    ToolShape("chatbot", 28.59, 15.45, 4.45, 25),
    ToolShape("image", 20.03, 7.88, 6.91, 10),
    ToolShape("tts", 17.32, 7.62, 6.88, 10),
)


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    tool: str
    after_tokens: int  # output tokens decoded when the call is made
    duration_s: float
    declared_s: float  # the tool's own estimate: its kind's mean
    result_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float
    prompt_ids: tuple[int, ...]
    calls: tuple[ScriptedCall, ...]
    num_output_tokens: int


def make_jobs(rate: float, args: argparse.Namespace, vocab: int, seed: int) -> list[Job]:
    """Poisson arrivals at ``rate``; each request draws a tool kind, its number of calls
    (capped) and segment lengths; tool times are |normal(mean, std)| x time scale."""
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for _ in range(args.num_requests):
        t += rng.expovariate(rate)
        shape = rng.choice(MIX)
        num_calls = max(1, min(args.max_calls, round(rng.expovariate(1 / shape.num_calls))))
        segments = [rng.randint(*args.segment_tokens) for _ in range(num_calls + 1)]
        calls, done = [], 0
        for n in segments[:-1]:
            done += n
            result = tuple(rng.randrange(100, vocab - 100) for _ in range(shape.num_result_tokens))
            duration = abs(rng.gauss(shape.mean_s, shape.std_s)) * args.time_scale
            calls.append(ScriptedCall(shape.name, done, duration, shape.mean_s * args.time_scale, result))
        prompt = tuple(rng.randrange(100, vocab - 100) for _ in range(rng.randint(*args.prompt_tokens)))
        jobs.append(Job(t, prompt, tuple(calls), sum(segments)))
    return jobs


@dataclass(slots=True)
class Timing:
    """Forward and copy time of a run, and the forward time's share spent recomputing
    (each step's time split by its tokens)."""

    forward_s: float = 0.0
    recompute_s: float = 0.0
    swap_s: float = 0.0

    def attach(self, engine: LLMEngine) -> None:
        """Time the runner's forward passes and copies (until ``detach``)."""
        execute, swap = engine.runner.execute, engine.runner.swap

        def timed_execute(plan):
            start = time.perf_counter()
            result = execute(plan)
            elapsed = time.perf_counter() - start
            self.forward_s += elapsed
            self.recompute_s += elapsed * plan.num_recompute_tokens / max(plan.num_tokens, 1)
            return result

        def timed_swap(swaps):
            start = time.perf_counter()
            swap(swaps)
            self.swap_s += time.perf_counter() - start

        engine.runner.execute, engine.runner.swap = timed_execute, timed_swap

    @staticmethod
    def detach(engine: LLMEngine) -> None:
        del engine.runner.execute, engine.runner.swap  # the instance attributes: back to the methods


@dataclass(slots=True)
class Run:
    policy: str
    rate: float
    seed: int = 0
    num_requests: int = 0
    num_completed: int = 0  # within --max-run-s (unfinished ones were aborted there)
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    normalized_latency_s: float = 0.0  # mean over requests of (finish - arrival) / output tokens
    recompute_share: float = 0.0
    forward_s: float = 0.0
    swap_s: float = 0.0
    num_preemptions: int = 0
    latencies_s: list[float] = field(default_factory=list)


def run_load(
    engine: LLMEngine,
    jobs: list[Job],
    policy: str,
    rate: float,
    seed: int = 0,
    declared: bool = False,
    max_run_s: float = 0.0,
) -> Run:
    """Serve ``jobs`` in real time (at most ``max_run_s`` when > 0); returns the run's measurements."""
    timing = Timing()
    timing.attach(engine)
    try:
        finish_s, requests, end_s = _serve(engine, jobs, declared, max_run_s)
    finally:
        timing.detach(engine)
    return _summarize(policy, rate, seed, requests, finish_s, end_s, timing)


def _serve(
    engine: LLMEngine, jobs: list[Job], declared: bool, max_run_s: float
) -> tuple[dict[str, float], dict, float]:
    """Returns when each request finished, the requests, and when the run ended (s from its start)."""
    arrivals = list(reversed(jobs))
    resumes: list[tuple[float, str]] = []
    live: dict[str, tuple[Job, int]] = {}  # request id -> (job, calls made)
    finish_s: dict[str, float] = {}
    requests = {}
    start = time.perf_counter()
    while arrivals or live:
        now = time.perf_counter() - start
        if max_run_s and now > max_run_s:
            _abort(engine, live)
            return finish_s, requests, now
        while arrivals and arrivals[-1].arrival_s <= now:
            job = arrivals.pop()
            rid = engine.add_request(
                list(job.prompt_ids), SamplingParams(max_tokens=job.num_output_tokens, ignore_eos=True)
            )
            live[rid], requests[rid] = (job, 0), (job, engine.get_request(rid))
        while resumes and resumes[0][0] <= now:
            rid = heapq.heappop(resumes)[1]
            job, made = live[rid]
            engine.resume(rid, list(job.calls[made - 1].result_ids))
        if not engine.scheduler.has_work:  # everyone waits on a tool or has not arrived
            events = ([arrivals[-1].arrival_s] if arrivals else []) + ([resumes[0][0]] if resumes else [])
            time.sleep(max(0.0, min(min(events, default=now) - now, 0.05)))
            continue
        outputs = engine.step()
        if not outputs:  # nothing could run (blocks held by requests on tools): wait a little
            time.sleep(0.001)
        for out in outputs:
            job, made = live[out.request_id]
            if out.finished:
                finish_s[out.request_id] = time.perf_counter() - start
                del live[out.request_id]
            elif made < len(job.calls) and out.num_output_tokens == job.calls[made].after_tokens:
                call = job.calls[made]
                engine.pause_for_tool(out.request_id, call.tool, call.declared_s if declared else None)
                live[out.request_id] = (job, made + 1)
                heapq.heappush(resumes, (time.perf_counter() - start + call.duration_s, out.request_id))
    return finish_s, requests, time.perf_counter() - start


def _abort(engine: LLMEngine, live: dict) -> None:
    """The run's time is up: abort what is left (and let the engine settle), so the next run starts clean."""
    for rid in list(live):
        engine.abort(rid)
    while engine.has_unfinished:
        engine.step()


def _summarize(
    policy: str,
    rate: float,
    seed: int,
    requests: dict,
    finish_s: dict[str, float],
    end_s: float,
    timing: Timing,
) -> Run:
    """A request still unfinished at the end counts with the run's end as its finish (a lower bound)."""
    first = min(job.arrival_s for job, _ in requests.values())
    duration = (max(finish_s.values()) if len(finish_s) == len(requests) else end_s) - first
    outputs = sum(len(r.output_token_ids) for _, r in requests.values())
    latencies = [
        (finish_s.get(rid, end_s) - job.arrival_s) / max(len(r.output_token_ids), 1)
        for rid, (job, r) in requests.items()
    ]
    return Run(
        policy,
        rate,
        seed,
        len(requests),
        len(finish_s),
        duration,
        len(finish_s) / duration,
        outputs / duration,
        sum(latencies) / len(latencies),
        timing.recompute_s / max(timing.forward_s, 1e-9),
        timing.forward_s,
        timing.swap_s,
        sum(r.num_preemptions for _, r in requests.values()),
        latencies,
    )


def truncated_model(spec: str, num_layers: int) -> str:
    """A copy of a model's first ``num_layers`` layers (its weights, config and tokenizer), so that
    runs stay short on a shared CPU with the same code path; the model itself when 0."""
    if num_layers <= 0:
        return spec
    import shutil

    from safetensors.torch import load_file, save_file

    from conveyor.config import cache_root
    from conveyor.engine.model.loader import resolve_model

    source = resolve_model(spec, progress=False)
    target = cache_root() / "bench" / f"{source.name}-{num_layers}-layers"
    if target.exists():
        return str(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    keep = lambda key: not key.startswith("model.layers.") or int(key.split(".")[2]) < num_layers
    for file in source.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(file).items() if keep(k)}, tmp / file.name)
    config = json.loads((tmp / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    os.replace(tmp, target)
    return str(target)


def engine_config(args: argparse.Namespace, variant: str) -> EngineConfig:
    policy, prefix_caching = VARIANTS[variant]
    return EngineConfig(
        model=ModelConfig(
            model=truncated_model(args.model, args.num_layers), dtype=args.dtype, num_threads=args.num_threads
        ),
        cache=CacheConfig(
            block_size=16,
            num_blocks=args.num_blocks,
            num_host_blocks=args.num_host_blocks,
            prefix_caching=prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            intercept=policy,
        ),
    )


def run_intercept_bench(args: argparse.Namespace) -> dict:
    """Every policy at every rate and seed, interleaved; writes the JSON, the table and the plot."""
    from conveyor.bench.intercept_report import write_report

    runs: list[Run] = []
    with ExitStack() as stack, Progress() as progress:
        engines = {
            v: stack.enter_context(LLMEngine(engine_config(args, v), progress=False)) for v in args.policies
        }
        for engine in engines.values():
            _warm_up(engine)
        vocab = next(iter(engines.values())).runner.args.vocab_size
        task = progress.add_task(
            "intercept bench", total=len(args.policies) * len(args.rates) * len(args.seeds)
        )
        for turn, (seed, (i, rate)) in enumerate(itertools.product(args.seeds, enumerate(args.rates))):
            jobs = make_jobs(rate, args, vocab, seed=seed * 1000 + i)
            for variant in _rotated(args.policies, turn):
                progress.update(task, description=f"{variant} at {rate} req/s, seed {seed}")
                runs.append(
                    run_load(engines[variant], jobs, variant, rate, seed, args.declared_times, args.max_run_s)
                )
                progress.advance(task)
    result = {
        "runs": [asdict(r) for r in runs],
        "config": _config(args),
        "loadavg": os.getloadavg(),
        **provenance(),
    }
    write_report(result, Path(args.json))
    return result


def _rotated(items: list[str], turn: int) -> list[str]:
    """Who goes first changes from one rate and seed to the next."""
    k = turn % len(items)
    return items[k:] + items[:k]


def _warm_up(engine: LLMEngine) -> None:
    """The same short load on every engine: kernels chosen, first steps of each size taken."""
    engine.generate(
        [[100 + i for i in range(64)], [300 + i for i in range(600)]],
        SamplingParams(max_tokens=16, ignore_eos=True),
    )


def _config(args: argparse.Namespace) -> dict:
    keys = (
        "model",
        "num_layers",
        "dtype",
        "rates",
        "policies",
        "seeds",
        "num_requests",
        "max_calls",
        "segment_tokens",
        "prompt_tokens",
        "time_scale",
        "num_blocks",
        "num_host_blocks",
        "max_num_seqs",
        "max_num_batched_tokens",
        "latency_bound_factor",
        "declared_times",
        "max_run_s",
    )
    return {k: getattr(args, k) for k in keys} | {"mix": [asdict(s) for s in MIX]}


def add_intercept_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="docs/results/intercept.json", help="where to write the results")
    parser.add_argument("--model", default="smollm2-135m", help="model (a small one keeps the runs short)")
    parser.add_argument(
        "--num-layers",
        type=int,
        default=4,
        help=(
            "run a copy of the model cut to its first N layers (same code path, less time per token); 0: all"
        ),
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--num-threads", type=int, default=2, help="torch CPU threads; 0 keeps torch's choice"
    )
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="arrivals per second"
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help=("engine policies, all with prefix caching; new-request-no-cache: new-request without it"),
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed at each rate"
    )
    parser.add_argument("--num-requests", type=int, default=10, help="requests per run")
    parser.add_argument(
        "--max-run-s",
        type=float,
        default=0.0,
        help=(
            "end a run after this many seconds, aborting what is left (counted unfinished; their latency up to "
            "then); 0: no limit"
        ),
    )
    parser.add_argument(
        "--declared-times",
        action="store_true",
        help=("tell auto each tool kind's true mean time (default: it learns a running mean of past calls)"),
    )
    parser.add_argument("--max-calls", type=int, default=3, help="cap on tool calls per request")
    parser.add_argument(
        "--segment-tokens", type=int, nargs=2, default=[8, 24], help="decode tokens between calls"
    )
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[32, 128], help="prompt length range")
    parser.add_argument(
        "--time-scale", type=float, default=0.25, help="tool times are the paper's times x this"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=40, help="device KV blocks of 16 tokens (small: pressure)"
    )
    parser.add_argument("--num-host-blocks", type=int, default=1024, help="host KV blocks for swapping")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument(
        "--latency-bound-factor",
        type=float,
        default=2.0,
        help=(
            "the normalized-latency bound for the throughput comparison: this x the lowest normalized latency "
            "at the lowest rate"
        ),
    )
