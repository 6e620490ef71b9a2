"""Server tools in shapes standard clients understand: the `openai` SDK's stream helpers and
LangChain's ChatOpenAI see the server's calls and results only in the extension fields
(`server_tool_calls`, `server_tool_results`), never as tool messages merged into the answer or as
calls they should run themselves. Also: tool_choice "none" keeps the tool list in the prompt."""

from __future__ import annotations

import json

import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI

from tests.server.conftest import API_KEY, live_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANSWER = "The value is value-of-k1."


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    yield from live_server(tmp_path_factory, max_tool_rounds=2)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def chat_model(live):
    return ChatOpenAI(
        base_url=live[0].url + "/v1", api_key=API_KEY, model="tiny", max_retries=0, temperature=0
    )


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_clean(live) -> None:
    _, engine = live
    assert not engine.has_unfinished and engine.block_manager.num_used_blocks == 0


def test_the_stream_helper_sees_the_answer_and_no_server_call(live, client):
    with client.chat.completions.stream(model="tiny", messages=ask("script:lookup")) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    text = "".join(e.delta for e in events if e.type == "content.delta")
    assert text == ANSWER and not any(e.type.startswith("tool_calls.") for e in events)
    message = final.choices[0].message
    assert message.content == ANSWER and not message.tool_calls  # no tool output merged in
    (call,) = message.model_extra["server_tool_calls"]  # the SDK accumulates the extension fields
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == {"key": "k1"}
    (result,) = message.model_extra["server_tool_results"]
    assert result == {"index": 0, "tool_call_id": call["id"], "content": "value-of-k1"}
    assert final.choices[0].finish_reason == "stop"
    assert_clean(live)


def test_a_mixed_turn_gives_the_client_only_its_own_call(live, client):
    with client.chat.completions.stream(
        model="tiny", messages=ask("script:mixed"), tools=[WEATHER]
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert message.tool_calls[0].index == 0  # indices count the client's calls alone
    assert [c["function"]["name"] for c in message.model_extra["server_tool_calls"]] == ["lookup"]
    assert final.choices[0].finish_reason == "tool_calls"
    assert_clean(live)


def test_max_tool_rounds_ends_with_an_answer_never_empty_tool_calls(live, client):
    with client.chat.completions.stream(model="tiny", messages=ask("script:three-lookups")) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == "Out of rounds."
    assert not choice.message.tool_calls and len(choice.message.model_extra["server_tool_results"]) == 3
    chunks = list(client.chat.completions.create(model="tiny", messages=ask("script:stubborn"), stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.tool_calls for d in deltas)  # a call in the answer turn is no call for the client
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and "max_tool_rounds" in last.model_extra["finish_detail"]
    assert_clean(live)


def test_langchain_streams_and_invokes_without_running_server_tools(live, chat_model):
    chunks = list(chat_model.stream("script:lookup"))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert isinstance(total, AIMessageChunk)
    assert total.content == ANSWER and not total.tool_calls and not total.tool_call_chunks
    message = chat_model.invoke("script:lookup")
    assert message.content == ANSWER and not message.tool_calls
    assert_clean(live)


def test_langchain_with_a_client_tool_gets_only_that_call(live, chat_model):
    message = chat_model.bind_tools([WEATHER]).invoke("script:mixed")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    streamed = list(chat_model.bind_tools([WEATHER]).stream("script:mixed"))
    total = streamed[0]
    for c in streamed[1:]:
        total += c
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert_clean(live)


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_forbids_calls(live, client, monkeypatch):
    _, engine = live
    rendered: list = []  # the tool specs each prompt was rendered with (the tiny template shows none)
    encode = engine.encode
    monkeypatch.setattr(
        engine, "encode", lambda prompt, tools=None: rendered.append(tools) or encode(prompt, tools)
    )
    history = [
        *ask("Weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    ]
    out = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none")
    assert (
        out.choices[0].message.content == "It is 22C in Paris." and out.choices[0].message.tool_calls is None
    )
    assert out.choices[0].finish_reason == "stop"
    assert rendered and all(tools == [WEATHER] for tools in rendered)  # listed, and no server tool
    free = client.chat.completions.create(
        model="tiny",
        messages=ask("free"),
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=30,
        temperature=1.5,
    )  # decoded under the no-call grammar
    assert free.choices[0].finish_reason in ("stop", "length") and free.choices[0].message.tool_calls is None
    assert "<tool_call>" not in (free.choices[0].message.content or "")
    # the grammar under "none": free text, but never the text that opens a call
    constraint = engine.driver.no_call_constraint([WEATHER], "none")
    *head, last = engine.tokenizer.encode("Sunny <tool_call>", add_special_tokens=False)
    assert all(constraint.try_accept(t) for t in head) and not constraint.try_accept(last)
    assert engine.driver.no_call_constraint([WEATHER], "auto") is None
    assert_clean(live)
