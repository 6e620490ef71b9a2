"""Exact continuation and session KV on the tiny model: a client tool call, then the follow-up
that repeats the conversation with a tool result."""

from __future__ import annotations

import pytest

from conveyor.engine.api import ContinuedChat
from tests.engine.helpers import make_engine
from tests.engine.scripted import script
from tests.tiny import build_tiny_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
RETURNED = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "call-1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call-1", "content": "22C and sunny"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")


@pytest.fixture(scope="module")
def engine(model_dir):
    with make_engine(model_dir, num_blocks=128, block_size=4, budget=256) as engine:
        yield engine


def run(engine, prompt, params, **options):
    """(the request, its outputs) once it has finished."""
    rid = engine.add_request(prompt, params, **options)
    request = engine.get_request(rid)
    outputs = []
    while not request.finished:
        outputs += [o for o in engine.step() if o.request_id == rid]
    return request, outputs


def call_turn(engine):
    scripted = lambda n: script(engine, CALL) if n == 0 else None
    return run(engine, QUESTION, {"max_tokens": 128}, tools=[WEATHER], constraint=scripted)


def test_a_follow_up_prefills_only_the_tool_result_turn_and_matches_a_fresh_prefill(
    engine, model_dir
) -> None:
    first, outputs = call_turn(engine)
    final = outputs[-1].final_token_ids
    assert final == first.token_ids and final[-1] == engine.tokenizer.eos_token_id
    assert first.request_id in engine.scheduler.sessions.retained  # its KV waits for the follow-up
    held = len(first.block_table)

    chat = ContinuedChat([*QUESTION, RETURNED, RESULT], 2, final, first.request_id)
    prepared = engine.prepare(chat, tools=[WEATHER])
    assert prepared.continues == first.request_id and prepared.token_ids[: len(final)] == final
    suffix = prepared.token_ids[len(final) :]
    # the template's text after the model's <|im_end|>, then the tool turn and the next header
    assert (
        engine.tokenizer.decode(suffix)
        == "\n<|im_start|>tool\n22C and sunny<|im_end|>\n<|im_start|>assistant\n"
    )

    params = {"max_tokens": 12, "ignore_eos": True}
    follow, outs = run(engine, prepared, params, tools=[WEATHER])
    prefilled = len(prepared.token_ids) - outs[-1].num_cached_tokens
    assert prefilled == len(suffix) + 1  # the tool-result turn and the model's end-of-turn token
    assert first.request_id not in engine.scheduler.sessions.retained and held > 0

    with make_engine(model_dir, num_blocks=128, block_size=4, budget=256, prefix_caching=False) as fresh:
        again, _ = run(fresh, list(prepared.token_ids), params)
    assert follow.output_token_ids == again.output_token_ids


def test_a_template_that_ends_the_turn_otherwise_falls_back_to_rendering(engine) -> None:
    first, outputs = call_turn(engine)
    final = outputs[-1].final_token_ids[:-1] + [engine.tokenizer.encode("x")[0]]  # not the stop token
    chat = ContinuedChat([*QUESTION, RETURNED, RESULT], 2, final, first.request_id)
    prepared = engine.prepare(chat, tools=[WEATHER])
    plain = engine.prepare([*QUESTION, RETURNED, RESULT], tools=[WEATHER])
    assert prepared.continues is None and prepared.token_ids == plain.token_ids
    engine.scheduler.sessions.release(first)


def test_a_turn_without_client_calls_keeps_nothing(engine) -> None:
    used = engine.block_manager.num_used_blocks
    scripted = lambda n: script(engine, "Sunny.") if n == 0 else None
    request, outputs = run(engine, QUESTION, {"max_tokens": 16}, tools=[WEATHER], constraint=scripted)
    assert outputs[-1].finish_reason == "stop" and outputs[-1].final_token_ids == request.token_ids
    assert request.request_id not in engine.scheduler.sessions.retained
    assert engine.block_manager.num_used_blocks == used
