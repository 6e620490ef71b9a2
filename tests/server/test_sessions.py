"""Exact continuation through the official openai client: the follow-up of a client tool call
repeats the conversation and its whole repeated prefix comes from the cache."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import API_KEY
from tests.server.test_chat import WEATHER, ask


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def call_turn(client, **extra):
    first = client.chat.completions.create(
        model="tiny", messages=ask("script:weather"), tools=[WEATHER], temperature=0, **extra
    )
    assert first.choices[0].finish_reason == "tool_calls"
    return first


def follow_up(client, message: dict, call_id: str):
    messages = [*ask("script:weather"), message, {"role": "tool", "tool_call_id": call_id, "content": "22C"}]
    return client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=0)


def test_the_follow_up_reuses_every_token_of_the_conversation(client, live) -> None:
    _, engine = live
    first = call_turn(client, metadata={"tool_time_s": "5"})
    message = first.choices[0].message
    repeated = first.usage.prompt_tokens + first.usage.completion_tokens  # ends with <|im_end|>
    second = follow_up(client, message.model_dump(), message.tool_calls[0].id)
    assert second.choices[0].message.content == "It is 22C in Paris."
    # all but the model's end-of-turn token, which it sampled but never computed, had KV kept
    assert second.usage.prompt_tokens_details.cached_tokens == repeated - 1
    assert second.usage.prompt_tokens > repeated
    assert not engine.scheduler.sessions.retained  # taken over by the follow-up, then freed


def test_a_streamed_call_is_continued_the_same_way(client) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=ask("script:weather"),
            tools=[WEATHER],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for e in c.choices[0].delta.tool_calls
    ]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    call = {
        "id": entries[0].id,
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": "".join(e.function.arguments or "" for e in entries),
        },
    }
    usage = chunks[-1].usage
    message = {"role": "assistant", "content": content or None, "tool_calls": [call]}
    second = follow_up(client, message, entries[0].id)
    assert (
        second.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens + usage.completion_tokens - 1
    )


def test_an_edited_call_falls_back_to_rendering(client, live) -> None:
    _, engine = live
    first = call_turn(client, metadata={"tool_time_s": "30"})  # past follow-ups here came in ms
    message = first.choices[0].message.model_dump()
    arguments = json.loads(message["tool_calls"][0]["function"]["arguments"])
    message["tool_calls"][0]["function"]["arguments"] = json.dumps({**arguments, "city": "Rome"})
    second = follow_up(client, message, message["tool_calls"][0]["id"])
    # only the prompt before the model's turn can match: the re-rendered turn is not its output
    assert second.usage.prompt_tokens_details.cached_tokens <= first.usage.prompt_tokens
    assert second.choices[0].message.content == "It is 22C in Paris."
    # the first turn's KV stays kept for a follow-up that never came, until its TTL
    assert first.id in engine.scheduler.sessions.retained


def test_other_tools_fall_back_to_rendering(client) -> None:
    first = call_turn(client)
    message = first.choices[0].message
    other = {**WEATHER, "function": {**WEATHER["function"], "name": "get_forecast"}}
    messages = [
        *ask("script:weather"),
        message.model_dump(),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "22C"},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, other], temperature=0, max_tokens=4
    )
    # rendered, not continued: the tiny template prints no tool calls, so the prompt is shorter
    # than the conversation the model saw (a continuation starts with all of it)
    assert second.usage.prompt_tokens < first.usage.prompt_tokens + first.usage.completion_tokens


def test_every_later_turn_continues_from_the_one_before(client) -> None:
    first = call_turn(client)
    message = first.choices[0].message
    messages = [
        *ask("script:weather"),
        message.model_dump(),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "22C"},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=0)
    assert second.choices[0].message.content == "It is 22C in Paris."
    messages += [second.choices[0].message.model_dump(), {"role": "user", "content": "Thanks!"}]
    third = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], temperature=0, max_tokens=4
    )
    repeated = second.usage.prompt_tokens + second.usage.completion_tokens
    # an answer keeps no KV, but its tokens are reused: the prefix cache holds their full blocks (of 4)
    assert repeated - 4 <= third.usage.prompt_tokens_details.cached_tokens < repeated


def test_a_bad_tool_time_hint_is_refused_naming_it(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        call_turn(client, metadata={"tool_time_s": "soon"})
    assert "tool_time_s" in str(e.value)
