"""Side effects accounted for: every call that ran is in the response, the tool-round limit
ends a request with a clear finish reason, client and server calls in one turn, calls of
tools nobody offered, and calls quoted in prose (text unless the client opts in)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import API_KEY, live_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    yield from live_server(tmp_path_factory, max_tool_rounds=2)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def server_calls(message) -> list[tuple[str, dict, str]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]), c["result"])
        for c in message.model_extra.get("server_tool_calls") or []
    ]


def assert_clean(live) -> None:
    _, engine = live
    assert not engine.has_unfinished and engine.block_manager.num_used_blocks == 0


def test_the_call_past_max_tool_rounds_is_reported_and_the_model_answers_without_tools(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:three-lookups"))
    calls = server_calls(out.choices[0].message)
    assert [(name, args["key"], result) for name, args, result in calls] == [
        ("lookup", f"k{i}", f"value-of-k{i}") for i in range(3)
    ]  # the 3rd ran: it is there
    assert out.choices[0].message.content == "Out of rounds." and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    assert_clean(live)


def test_an_answer_turn_that_calls_again_ends_with_length_and_says_why(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:stubborn"))
    calls = server_calls(out.choices[0].message)
    assert [r for _, _, r in calls[:3]] == [f"value-of-k{i}" for i in range(3)]
    assert len(calls) == 4 and calls[3][2].startswith("Error: unknown tool 'lookup'")  # no tool offered
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.tool_calls is None
    assert "max_tool_rounds" in out.choices[0].model_extra["finish_detail"]
    assert_clean(live)


def test_an_external_call_past_max_tool_rounds_does_not_run(live, client):
    chunks = list(
        client.chat.completions.create(model="tiny", messages=ask("script:two-then-record"), stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    results = [e["content"] for d in deltas for e in d.model_extra.get("server_tool_results") or []]
    assert results[:2] == ["value-of-k0", "value-of-k1"]
    assert len(results) == 3 and "not run" in results[2] and "max_tool_rounds (2)" in results[2]
    entries = [e for d in deltas for e in d.model_extra.get("server_tool_calls") or []]
    assert [e["function"]["name"] for e in entries if "id" in e] == ["lookup", "lookup", "record"]
    assert not any(d.tool_calls for d in deltas)
    assert "".join(d.content or "" for d in deltas) == "Out of rounds."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_clean(live)


def test_a_call_cut_by_max_tokens_is_still_listed(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:long-call"), max_tokens=60)
    ((name, _, result),) = [
        (c["function"]["name"], c["function"]["arguments"], c["result"])
        for c in out.choices[0].message.model_extra["server_tool_calls"]
    ]
    assert name == "lookup" and result is None and out.choices[0].finish_reason == "length"
    assert_clean(live)


def test_client_and_server_calls_in_one_turn(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:mixed"), tools=[WEATHER])
    message = out.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert server_calls(message) == [("lookup", {"key": "k1"}, "value-of-k1")]  # it ran: it is reported
    assert out.choices[0].finish_reason == "tool_calls"
    assert_clean(live)


def test_a_tool_nobody_offered_is_never_a_call(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:unoffered"), tools=[WEATHER])
    message = out.choices[0].message
    assert message.tool_calls is None
    ((name, _, result),) = server_calls(message)
    assert name == "rm_rf" and result.startswith("Error: unknown tool 'rm_rf'")
    assert message.content == "Sorry." and out.choices[0].finish_reason == "stop"
    assert_clean(live)


def test_calls_quoted_in_prose_are_text_unless_the_client_opts_in(live, client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:fence"), max_tokens=300)
    message = out.choices[0].message
    assert not server_calls(message) and message.tool_calls is None
    assert '```json\n{"name": "record"' in message.content and message.content.endswith("That is all.")
    assert out.choices[0].finish_reason == "stop"
    opted = client.chat.completions.create(
        model="tiny", messages=ask("script:fence"), max_tokens=300, extra_body={"lenient_tool_calls": True}
    )
    assert [(n, a, r) for n, a, r in server_calls(opted.choices[0].message)] == [
        ("record", {"key": "fence"}, "recorded-fence"),
        ("record", {"key": "bare"}, "recorded-bare"),
    ]
    assert_clean(live)
