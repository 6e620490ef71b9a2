"""Tool rounds in the engine, on a tiny random model whose outputs are scripted.

The model "writes" a call (forced tokens); the engine runs it in a worker, keeps the
request's KV while it waits, appends the tool-result turn and continues.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conveyor.config import ToolConfig
from conveyor.core.request import RequestState
from conveyor.tools.base import Tool, ToolRejected, tool
from tests.engine.helpers import (
    assert_all_blocks_free,
    drain,
    make_engine,
    results_of,
    text_of,
)
from tests.engine.scripted import script
from tests.tiny import build_tiny_model


@tool(side_effects="none")
def lookup(key: str, times: int = 1) -> str:
    """Look a key up."""
    return f"value-of-{key}" * times


class Form(Tool):
    name = "form"
    side_effects = "none"
    parameters = {"type": "object", "properties": {"email": {"type": "string"}, "age": {"type": "integer"}}}

    def on_field(self, key, value):
        if key == "email" and "@" not in value:
            raise ToolRejected(f"field 'email': {value!r} is not an email address")

    def finish(self, args):
        return "ok"


@tool
def send_mail(to: str) -> str:
    """Send an e-mail (an external side effect)."""
    Path("sent.txt").write_text(to)  # inside the worker's private temp dir
    return f"sent to {to}"


TOOLS = (
    "tests.engine.test_tools:lookup",
    "tests.engine.test_tools:Form",
    "tests.engine.test_tools:send_mail",
    "python",
)
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"key": "k1", "times": 2}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is k1?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")
    tools = ToolConfig(tools=TOOLS, constrained=False, num_workers=2, call_timeout_s=10)
    with make_engine(model_dir, num_blocks=128, budget=64, tools=tools) as engine:
        yield engine


def run(engine, turns: list[str], **kwargs):
    """Run one request whose turns are scripted (free greedy decoding after the last); returns its outputs."""
    rid = engine.add_request(
        QUESTION,
        {"max_tokens": 500},
        **kwargs,
        constraint=lambda n: script(engine, turns[n]) if n < len(turns) else None,
    )
    return drain(engine, rid)


@pytest.mark.parametrize("mode", ["partial", "lazy"])
def test_a_call_runs_and_the_request_continues(engine, mode) -> None:
    outputs = run(engine, ["Let me look.\n" + CALL, "It is value-of-k1."], tools=["lookup"], tool_mode=mode)
    assert results_of(outputs) == ["value-of-k1value-of-k1"]
    assert text_of(outputs) == "Let me look.\n" + CALL + "It is value-of-k1.", repr(text_of(outputs)[-30:])
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop"
    kinds = [span.kind for span in outputs[-1].timeline]
    assert kinds == ["decode", "tool:lookup", "wait", "decode"]
    assert_all_blocks_free(engine)


def test_partial_and_lazy_give_the_same_tokens(engine) -> None:
    """Same scripted call, then free greedy decoding: identical results and tokens."""
    runs = {}
    for mode in ("partial", "lazy"):
        outputs = run(engine, [CALL], tools=["lookup"], tool_mode=mode)
        runs[mode] = ([t for o in outputs for t in o.new_token_ids], results_of(outputs), text_of(outputs))
    assert runs["partial"] == runs["lazy"]


def test_the_kv_is_kept_while_the_tool_runs(engine) -> None:
    rid = engine.add_request(QUESTION, {"max_tokens": 200}, tools=["lookup"], constraint=script(engine, CALL))
    request = engine.get_request(rid)
    resumed = False
    while engine.has_unfinished:
        for out in engine.step():
            if request.state is RequestState.AWAITING_TOOL and not resumed:
                computed, num_tokens, blocks = (
                    request.num_computed_total,
                    request.num_tokens,
                    list(request.block_table),
                )
                assert blocks
            resumed = resumed or bool(out.tool_results)
            if resumed and out.new_token_ids:  # the first token after the tool-result turn
                appended = request.num_tokens - 1 - num_tokens
                # only the appended turn and the stop token that ended the model's turn were prefilled
                assert request.num_computed_total == computed + appended + 1
                assert request.block_table[: len(blocks)] == blocks
                engine.abort(rid)
    assert resumed
    assert_all_blocks_free(engine)


def test_python_fence_lines_run_and_results_come_back(engine) -> None:
    code = "```python\nx = 6 * 7\nfor i in range(2):\n    x += 1\nprint(x)\n```"
    outputs = run(engine, [code, "Done."], tools=["python"])
    assert results_of(outputs) == ["44\n"] or results_of(outputs)[0].strip() == "44"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two torch threads to give one up")
def test_a_running_tool_gets_a_core_while_decoding_goes_on(engine, monkeypatch) -> None:
    pool, deadline = engine.driver.executor.pool, time.perf_counter() + 30
    while pool.num_idle < engine.config.tools.num_workers:  # each worker serves one call: the
        assert time.perf_counter() < deadline  # replacements of the last test's start
        pool.poll(0.05)
    threads, execute = [], engine.runner.execute

    def execute_and_record(plan):
        threads.append((torch.get_num_threads(), bool(results_of(outputs))))
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", execute_and_record)
    outputs: list = []
    code = "```python\nimport time\ntime.sleep(1.0)\nx = 1\n```"
    rid = engine.add_request(
        QUESTION,
        {"max_tokens": 50},
        tools=["python"],
        constraint=lambda n: script(engine, [code, "Done."][n]) if n < 2 else None,
    )
    while engine.has_unfinished:
        outputs += [o for o in engine.step() if o.request_id == rid]
    full = engine.runner.num_threads
    assert (full - 1, False) in threads  # decoded on with the sleep running
    assert (full, True) in threads  # and all threads back after it
    assert torch.get_num_threads() == full


def test_a_rejected_field_cuts_the_turn_off(engine) -> None:
    tail = "1" * 300  # a worker answers in far fewer steps than this
    bad = (
        '<tool_call>\n{"name": "form", "arguments": {"email": "nope", "age": 3, "x": '
        + tail
        + "}}\n</tool_call>"
    )
    outputs = run(engine, [bad, "Sorry."], tools=["form"])
    results = [r for o in outputs for r in o.tool_results]
    assert len(results) == 1 and results[0].rejected and "not an email" in results[0].content
    assert tail not in text_of(outputs)  # decoding stopped before the rest of the call
    assert outputs[-1].finish_reason == "stop"
    assert_all_blocks_free(engine)


def test_external_tool_never_runs_on_length_or_abort(engine) -> None:
    call = '<tool_call>\n{"name": "send_mail", "arguments": {"to": "a@b.c"}}\n</tool_call>'
    num_call_tokens = len(engine.tokenizer.encode(call))
    rid = engine.add_request(
        QUESTION,
        {"max_tokens": num_call_tokens + 3},
        tools=["send_mail"],
        constraint=script(engine, call + "x" * 20),
    )  # complete call, then out of tokens
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert outputs[-1].finish_reason == "length"
    rid = engine.add_request(
        QUESTION, {"max_tokens": 100}, tools=["send_mail"], constraint=script(engine, call + "x" * 20)
    )
    while len(engine.get_request(rid).output_token_ids) < num_call_tokens + 3:
        outputs += engine.step()
    outputs.append(engine.abort(rid))
    assert not results_of(outputs) and outputs[-1].finish_reason == "abort"
    assert engine.driver.executor.pool.num_busy == 0
    assert_all_blocks_free(engine)


def test_abort_during_a_call_frees_workers_and_blocks(engine) -> None:
    slow = "```python\nimport time\ntime.sleep(30)\n```"
    rid = engine.add_request(QUESTION, {"max_tokens": 100}, tools=["python"], constraint=script(engine, slow))
    while engine.get_request(rid).state is not RequestState.AWAITING_TOOL:
        engine.step()
    pool = engine.driver.executor.pool
    assert pool.num_busy == 1
    engine.abort(rid)
    pool.poll(2.0)
    assert pool.num_busy == 0 and not engine.has_unfinished
    assert_all_blocks_free(engine)
    assert results_of(run(engine, [CALL, "ok"], tools=["lookup"])) == ["value-of-k1value-of-k1"]


def test_bad_tool_requests_are_clear_errors(engine) -> None:
    with pytest.raises(ValueError, match="unknown tools"):
        engine.add_request(QUESTION, tools=["nope"])
    with pytest.raises(ValueError, match="tool mode"):
        engine.add_request(QUESTION, tools=["lookup"], tool_mode="eager")
    assert not engine.has_unfinished and not engine.driver.sessions
    assert_all_blocks_free(engine)


def test_past_max_tool_rounds_the_model_answers_under_a_no_call_grammar(engine, monkeypatch) -> None:
    from conveyor.tools.grammar import Constraint

    given = []
    next_constraint = engine.driver.next_constraint
    monkeypatch.setattr(
        engine.driver, "next_constraint", lambda rid: given.append(next_constraint(rid)) or given[-1]
    )
    rid = engine.add_request(
        QUESTION,
        {"max_tokens": 400, "temperature": 0},
        tools=["lookup"],
        tool_choice={"type": "function", "function": {"name": "lookup"}},  # the grammar writes a call
        max_tool_rounds=0,
    )
    outputs = drain(engine, rid)
    assert [r.name for o in outputs for r in o.tool_results] == ["lookup"]
    assert len(given) == 1 and isinstance(given[0], Constraint)  # the answer turn: free text, no call
    resumed = next(i for i, o in enumerate(outputs) if o.tool_results)
    answer = "".join(o.new_text for o in outputs[resumed:])
    assert "<tool_call>" not in answer and outputs[-1].finish_reason in ("stop", "length")
    assert_all_blocks_free(engine)
