"""Each workload end to end in paced mode on a tiny random model: the model's turns are
scripted (replayed through the engine loop), the tools are the real ones."""

from __future__ import annotations

import json

import pytest

from conveyor.bench.workloads import BUILDERS
from conveyor.bench.workloads.base import WorkloadOptions
from conveyor.bench.workloads.paced import Pace
from conveyor.bench.workloads.report import summarize
from conveyor.bench.workloads.runner import BenchOptions, run_workloads
from conveyor.config import CacheConfig, EngineConfig, ModelConfig, ToolConfig
from tests.tiny import build_tiny_model, byte_tokenizer

FORM = (
    '{"customer": "Dana Moss", "email": "%s", "ship_date": "2025-03-14", "country": "Canada", '
    '"address": "88 Queen Street West, Toronto", "items": [{"product": "desk lamp", "quantity": 2}], '
    '"gift_message": "Happy birthday!", "delivery_notes": "Back door after 5 pm."}'
)
SCRIPTS = {
    "codegen": [
        "```python\nimport math\nprimes = 148933\nprint(primes, math.pi)\n```",
        "There are 148933 primes.",
    ],
    "search": [
        (
            '<tool_call>\n{"name": "search", "arguments": {"query": "serialize object JSON string", "k": 2}}'
            "\n</tool_call>"
        ),
        "Use json.dumps.",
    ],
    "planning": [
        (
            '1. search("argparse command line options", 1)\n2. search("csv reader file", 1)\n'
            '3. search("shutil copy2 metadata", 1)\n4. join()\n<END_OF_PLAN>'
        ),
        "Use argparse, csv, shutil.",
    ],
    "validation-valid": [
        '<tool_call>\n{"name": "submit_order", "arguments": %s}\n</tool_call>'
        % (FORM % "dana.moss@example.com"),
        "Filed.",
    ],
    "validation-invalid": [
        '<tool_call>\n{"name": "submit_order", "arguments": %s}\n</tool_call>'
        % (FORM % "dana.moss.example.com"),
        "Please fix the e-mail address.",
    ],
    "database": [
        (
            '<tool_call>\n{"name": "sqlite", "arguments": {"query": "SELECT species, avg(petal_length) FROM '
            'iris GROUP BY species"}}\n</tool_call>'
        ),
        "Setosa 1.46, versicolor 4.26, virginica 5.55.",
    ],
    "calculator": [
        (
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48271 * 9133 - 2**20"}}\n'
            "</tool_call>"
        ),
        "439822467 screws are left.",
    ],
}
OVERLAPS = {"search", "planning", "validation-invalid"}  # codegen's scripted program runs in 1 ms
# Lazy mode dispatches a hermes call at its CallEnd (the closing brace), so its tool overlaps the
# rest of the turn ("\n</tool_call>" and EOS: 14 steps, ~28 ms at 2 ms a step) and the ideal is
# only what the tool runs past that. The search call makes 3 serial requests to the service (the
# search, then k=2 pages): at 5 ms each it took 28-33 ms, a coin flip against the tail whatever
# ran first; at 20 ms each it takes ~75 ms, so tool time clearly outlasts the decode.
SEARCH_LATENCY_MS = 20.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model (its position limit raised: paced mode runs no forward pass) and the
    scripted turns written as recorded outputs."""
    root = tmp_path_factory.mktemp("workloads")
    model_dir = build_tiny_model(root / "model", "qwen2")
    config_path = model_dir / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": 8192})
    )
    tokenizer = byte_tokenizer()
    recorded = root / "recorded"
    recorded.mkdir()
    for name, turns in SCRIPTS.items():
        ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in turns]
        (recorded / f"{name}.json").write_text(json.dumps({"case": name, "turns": ids}))
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir)),
        cache=CacheConfig(num_blocks=512),
        tools=ToolConfig(num_workers=2, call_timeout_s=20),
    )
    return config, recorded


@pytest.mark.parametrize("workload", list(BUILDERS))
def test_workload_runs_end_to_end_in_both_modes(setup, workload, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))  # the database is built here
    config, recorded = setup
    options = BenchOptions(
        "paced",
        1,
        (workload,),
        Pace(2.0, 0.0),
        WorkloadOptions(search_latency_ms=SEARCH_LATENCY_MS),
        recorded_dir=recorded,
    )
    rounds = run_workloads(config, options)
    assert set(rounds) == {name for name in SCRIPTS if name.startswith(workload)}
    for name, runs in rounds.items():
        assert [r.tool_mode for r in runs] == ["lazy", "partial"]
        for run in runs:
            assert run.valid_call, (name, run.tool_mode, [r.content for r in run.results])
            assert run.correct, (name, run.tool_mode, [r.content[:300] for r in run.results])
            assert len(run.turns) == 2
        row = summarize(runs)
        assert row["rounds"] == 1 and row["success_rate"] == 1.0
        lazy = runs[0]
        tool_s = sum(r.done_at - r.started_at for r in lazy.results)
        if name in OVERLAPS:  # a field or line completes well before the call ends: tool time to hide
            assert row["ideal_reduction"] > 0.0, (
                name,
                lazy.timeline,
                [(r.started_at, r.done_at) for r in lazy.results],
            )
        if not lazy.results[0].rejected:  # without a rejection the saving is tool time that overlaps
            assert lazy.ideal_saving_s <= tool_s + 1e-6, (name, lazy.ideal_saving_s, tool_s)


def test_a_rejected_field_cuts_the_partial_turn_short(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))
    config, recorded = setup
    options = BenchOptions("paced", 1, ("validation",), Pace(2.0, 0.0), recorded_dir=recorded)
    lazy, partial = run_workloads(config, options)["validation-invalid"]
    assert len(partial.turns[0]) < len(lazy.turns[0])  # decoding stopped at the bad e-mail
    assert lazy.ideal_saving_s > 0.0  # the lazy round knows when it was decoded


def _first_turn(run) -> str:
    return "".join(text for _, turn, text in run.deltas if turn == 0)


@pytest.mark.parametrize("workload", ["search", "planning", "validation"])
def test_paced_rounds_through_the_remote_backend(setup, workload, monkeypatch, tmp_path):
    """--paced-remote: the same recorded turns streamed by the stand-in remote engine over HTTP."""
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))
    config, recorded = setup
    options = BenchOptions(
        "paced",
        1,
        (workload,),
        Pace(2.0, 0.0),
        WorkloadOptions(search_latency_ms=5.0),
        recorded_dir=recorded,
        paced_remote=True,
    )
    rounds = run_workloads(config, options)
    for name, runs in rounds.items():
        for run in runs:
            assert run.valid_call and run.correct, (
                name,
                run.tool_mode,
                [r.content[:300] for r in run.results],
            )
            assert SCRIPTS[name][0].startswith(_first_turn(run)) and len(run.turns) == 2
    if workload == "validation":
        lazy, partial = rounds["validation-invalid"]
        # lazily the form streams to its end; partially the stream is closed at the bad e-mail
        assert '"delivery_notes"' in _first_turn(lazy) and '"ship_date"' not in _first_turn(partial)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mode", "paced", "--backend", "http://127.0.0.1:9"], "paced mode replays"),
        (["--mode", "paced", "--embedded-baseline"], "compares a remote run"),
    ],
)
def test_bench_flags_that_cannot_go_together_fail_before_anything_runs(flags, message, tmp_path, capsys):
    from conveyor.cli import main

    out = tmp_path / "w.json"
    assert (
        main(["bench", "workloads", *flags, "--workloads", "search", "--plots", "", "--json", str(out)]) != 0
    )
    assert message in capsys.readouterr().err and not out.exists()
