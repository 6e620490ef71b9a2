"""`conveyor bench workloads`: each case in lazy and partial mode, alternating, in paced or live
mode; per case the latencies, the reduction, the ideal reduction and the success rate."""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from conveyor.bench.results import write_json
from conveyor.bench.workloads import BUILDERS
from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions
from conveyor.bench.workloads.paced import Pace, PacedRunner, replay_factory
from conveyor.bench.workloads.rounds import Round, ideal_of, run_case
from conveyor.config import EngineConfig

RECORDED = Path(__file__).parent / "recorded"
MODES = ("paced", "live")
STOP = "<tool_response>"  # the small model tends to write a tool result itself after the real one


@dataclass(frozen=True, slots=True)
class BenchOptions:
    mode: str = "paced"
    rounds: int = 5
    workloads: tuple[str, ...] = tuple(BUILDERS)
    pace: Pace = Pace()
    workload: WorkloadOptions = WorkloadOptions()
    temperature: float = 0.0  # live mode; each lazy/partial pair shares a seed
    recorded_dir: Path = RECORDED  # paced mode reads fixtures here; live mode writes them (record=True)
    record: bool = False
    paced_remote: bool = False  # paced mode through RemoteEngine and a stand-in remote engine

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be paced or live, got {self.mode!r}")
        if self.rounds < 1 or self.rounds % 2 == 0:
            raise ValueError(
                f"rounds must be odd and >= 1 (the median is then a measured pair), got {self.rounds}"
            )
        unknown = set(self.workloads) - set(BUILDERS)
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {', '.join(BUILDERS)}")
        if self.paced_remote and self.mode != "paced":
            raise ValueError("paced_remote needs paced mode")


def run_workloads(config: EngineConfig, options: BenchOptions) -> dict[str, list[Round]]:
    """Every case of every chosen workload, `rounds` pairs each; returns the rounds by case."""
    rounds: dict[str, list[Round]] = {}
    with Progress() as progress:
        for name in options.workloads:
            workload = BUILDERS[name](options.workload)
            try:
                with _engine(config, workload, options) as engine:
                    tools = {getattr(t, "name", ""): t for t in workload.tools}
                    for case in workload.cases:
                        task = progress.add_task(f"{options.mode} {case.name}", total=2 * options.rounds)
                        rounds[case.name] = _run_pairs(engine, case, tools, options, progress, task)
            finally:
                workload.close()
                gc.collect()  # free this engine's model and KV before the next one loads
    return rounds


@contextmanager
def _engine(config: EngineConfig, workload: Workload, options: BenchOptions) -> Iterator[Any]:
    tools = dataclasses.replace(config.tools, tools=(), num_workers=max(2, min(config.tools.num_workers, 4)))
    config = dataclasses.replace(config, tools=tools)
    if options.paced_remote:
        with _paced_remote_engine(config, workload, options) as engine:
            yield engine
        return
    if options.mode == "paced":
        from conveyor.engine.engine import LLMEngine

        factory = PacedRunner.factory(options.pace, _eos_of(config))
        engine = LLMEngine(config, progress=False, tools=workload.tools, runner_factory=factory)
    else:
        from conveyor.backends import open_engine

        engine = open_engine(config, tools=workload.tools)
    with engine:
        yield engine


@contextmanager
def _paced_remote_engine(config: EngineConfig, workload: Workload, options: BenchOptions) -> Iterator[Any]:
    """RemoteEngine in front of the paced stand-in engine (`paced_remote.py`), stopped on exit."""
    from conveyor.backends.remote import RemoteEngine
    from conveyor.bench.workloads.paced_remote import start_paced_engine
    from conveyor.engine.model.loader import resolve_model

    url, stop = start_paced_engine(
        resolve_model(config.model.model, progress=False), options.pace, [_eos_of(config)]
    )
    try:
        backend = dataclasses.replace(config.backend, backend=url, backend_dialect="none")
        with RemoteEngine(
            dataclasses.replace(config, backend=backend), progress=False, tools=workload.tools
        ) as engine:
            yield engine
    finally:
        stop()


def _eos_of(config: EngineConfig) -> int:
    from conveyor.engine.model.loader import resolve_model

    eos = json.loads((resolve_model(config.model.model, progress=False) / "config.json").read_text())[
        "eos_token_id"
    ]
    return eos[0] if isinstance(eos, list) else eos


def _run_pairs(
    engine: Any, case: Case, tools: dict[str, Any], options: BenchOptions, progress: Progress, task: Any
) -> list[Round]:
    """A discarded warm-up pair, then `rounds` measured pairs; the mode that goes first alternates."""
    turns = _fixture(options.recorded_dir, case.name)["turns"] if options.mode == "paced" else None
    max_tokens = sum(map(len, turns)) + 8 if turns else case.max_tokens
    tokenizer = getattr(engine, "tokenizer", None)
    runs: list[Round] = []
    for number in range(-1, options.rounds):
        order = ("lazy", "partial") if number % 2 == 0 else ("partial", "lazy")
        for tool_mode in order:
            params = {
                "max_tokens": max_tokens,
                "temperature": options.temperature,
                "seed": max(number, 0),
                "stop": [STOP],
            }
            run = run_case(engine, case, tool_mode, params, _replay(turns, options.paced_remote))
            if number < 0:
                continue  # the warm-up: first imports, page cache, prompt KV, for both modes alike
            if tool_mode == "lazy":
                run.ideal_saving_s = ideal_of(run, case.call_format, tools, tokenizer, (STOP,))
                run.ideal_by_text_s = ideal_of(run, case.call_format, tools)
            runs.append(run)
            progress.advance(task)
    if options.record:
        _record(options.recorded_dir, case, runs)
    return runs


def _replay(turns: list[list[int]] | None, remote: bool) -> Any:
    """Paced mode's per-turn constraint: the recorded tokens, as a Replay for the embedded engine
    or as the stand-in remote engine's `replay` field."""
    if not turns:
        return None
    if remote:
        return lambda n: {"replay": turns[n] if n < len(turns) else []}
    return replay_factory(turns)


def _fixture(directory: Path, name: str) -> dict[str, Any]:
    path = directory / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no recorded output for {name!r} at {path}: record one with --mode live --record")
    return json.loads(path.read_text())


def _record(directory: Path, case: Case, runs: list[Round]) -> None:
    """Keep a lazy round's tokens (a full turn even where partial mode cuts it), a correct one if any."""
    lazy = [r for r in runs if r.tool_mode == "lazy"]
    best = next((r for r in lazy if r.correct), lazy[0])
    data = {
        "case": case.name,
        "correct": best.correct,
        "turns": best.turns,
        "text": "".join(d[2] for d in best.deltas),
        "results": [r.content[:400] for r in best.results],
    }
    write_json(directory / f"{case.name}.json", data)
