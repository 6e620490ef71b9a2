"""The paced clock: a case without calls takes the same time in lazy and partial mode, and N
decoded tokens take about N x the emulated step; and the ideal's events are timed by the step
that sampled their last token, not by when the engine's text arrived."""

from __future__ import annotations

import json
import statistics

import pytest

from conveyor.bench.workloads.base import Case, user
from conveyor.bench.workloads.paced import Pace, PacedRunner, replay_factory
from conveyor.bench.workloads.rounds import _timed_events, run_case, token_events
from conveyor.config import CacheConfig, EngineConfig, ModelConfig, ToolConfig
from conveyor.tools.builtin.calculator import CalculatorTool
from conveyor.tools.parsers import FieldDone
from tests.tiny import build_tiny_model, byte_tokenizer

STEP_MS = 20.0
TEXT = "No arithmetic is needed: the answer is four."  # 44 tokens with the byte tokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conveyor.engine.engine import LLMEngine

    model_dir = build_tiny_model(tmp_path_factory.mktemp("paced") / "model", "qwen2")
    config_path = model_dir / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": 8192})
    )
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir)),
        cache=CacheConfig(num_blocks=256),
        tools=ToolConfig(num_workers=1, call_timeout_s=20),
    )
    factory = PacedRunner.factory(Pace(STEP_MS, 0.0), byte_tokenizer().eos_token_id)
    with LLMEngine(config, progress=False, tools=[CalculatorTool()], runner_factory=factory) as engine:
        yield engine


def test_the_paced_clock_charges_lazy_and_partial_alike(engine):
    tokenizer = byte_tokenizer()
    tokens = tokenizer.encode(TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
    case = Case(
        "plain", (user("What is 2 + 2?"),), ("calculator",), tool_choice="auto", max_tokens=len(tokens) + 8
    )
    latencies: dict[str, list[float]] = {"lazy": [], "partial": []}
    for order in (("lazy", "partial"), ("partial", "lazy"), ("lazy", "partial")):
        for mode in order:
            run = run_case(engine, case, mode, {"max_tokens": len(tokens) + 8}, replay_factory([tokens]))
            assert run.text == TEXT and not run.results
            latencies[mode].append(run.latency_s)
    lazy, partial = (statistics.median(latencies[m]) for m in ("lazy", "partial"))
    expected_s = len(tokens) * STEP_MS / 1000  # one step per sampled token, the first with the prefill
    assert abs(lazy - partial) < 0.05 * expected_s, latencies
    for value in (lazy, partial):
        assert 0.95 * expected_s < value < 1.25 * expected_s, (value, expected_s)


def test_events_are_timed_by_the_step_that_sampled_their_last_token():
    tokenizer = byte_tokenizer()
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "abc", "k": 2}}\n</tool_call>'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    times = [0.02 * (k + 1) for k in range(len(tokens))]
    closing = text.index('"abc"') + len('"abc"') - 1  # the token that closes the field's value
    by_token = {
        e.key: t for t, e in token_events("hermes", tokens, times, tokenizer) if isinstance(e, FieldDone)
    }
    assert times[closing] <= by_token["query"] <= times[closing + 1]
    # the same text held back by a slow detokenizer until the end: timed by arrival the field moves there
    held = {e.key: t for t, e in _timed_events("hermes", [(times[-1], text)]) if isinstance(e, FieldDone)}
    assert held["query"] == times[-1] > by_token["query"] + 0.3


def test_a_stop_string_ends_the_events_where_the_engine_ends_the_text():
    tokenizer = byte_tokenizer()
    text = 'Answer.<tool_response>\n{"name": "search", "arguments": {"query": "x"}}'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    events = token_events(
        "hermes", tokens, [float(k) for k in range(len(tokens))], tokenizer, ("<tool_response>",)
    )
    assert not [e for _, e in events if isinstance(e, FieldDone)]
