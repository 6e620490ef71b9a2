"""Chat and completions through the official openai client against a live server."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.server.conftest import API_KEY

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    import httpx

    assert httpx.get(live[0].url + "/health").json() == {"status": "ok"}


def test_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model="tiny", messages=ask("hello"), max_tokens=12, temperature=0)
    reason = full.choices[0].finish_reason
    assert reason == "length" or (reason == "stop" and full.usage.completion_tokens <= 12)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=ask("hello"),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions(client):
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_tiny_top_p_is_the_most_likely_token(client):
    greedy = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    tiny = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=1, top_p=1e-300)
    assert tiny.choices[0].text == greedy.choices[0].text  # 1e-300 is 0 in float32: once a 500


def test_client_tool_streamed_then_follow_up_hits_prefix_cache(client):
    messages = ask("script:weather")
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], stream=True)
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for e in c.choices[0].delta.tool_calls
    ]
    assert entries[0].index == 0 and entries[0].id and entries[0].function.name == "get_weather"
    assert all(e.id is None and e.function.name is None for e in entries[1:])
    assert len(entries) > 2  # arguments came in fragments
    arguments = "".join(e.function.arguments or "" for e in entries)
    assert json.loads(arguments) == {"city": "Paris", "unit": "c"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    call = {
        "id": entries[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": entries[0].id, "content": "22C"},
    ]
    out = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER])
    assert out.choices[0].message.content == "It is 22C in Paris."
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens_details.cached_tokens >= 24  # the first request's prompt blocks


def test_client_tools_non_streaming_and_parallel_flag(client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:two-calls"), tools=[WEATHER])
    calls = out.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Rome", "Oslo"]
    assert out.choices[0].finish_reason == "tool_calls" and len({c.id for c in calls}) == 2
    one = client.chat.completions.create(
        model="tiny", messages=ask("script:two-calls"), tools=[WEATHER], parallel_tool_calls=False
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"


def test_server_tool_round_trip(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ask("script:lookup"), stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.tool_calls for d in deltas) and all(d.role in (None, "assistant") for d in deltas)
    calls = [e for d in deltas for e in d.model_extra.get("server_tool_calls") or []]
    assert calls[0]["function"]["name"] == "lookup"
    results = [e for d in deltas for e in d.model_extra.get("server_tool_results") or []]
    assert results == [{"index": 0, "tool_call_id": calls[0]["id"], "content": "value-of-k1"}]
    assert "".join(d.content or "" for d in deltas) == "The value is value-of-k1."
    assert chunks[-1].choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model="tiny", messages=ask("script:lookup"))
    message = out.choices[0].message
    assert message.content == "The value is value-of-k1." and message.tool_calls is None
    assert message.model_extra["server_tool_calls"][0]["result"] == "value-of-k1"


def test_mcp_tool_round_trip(client):
    out = client.chat.completions.create(model="tiny", messages=ask("script:mcp"))
    (call,) = out.choices[0].message.model_extra["server_tool_calls"]
    assert call["function"]["name"] == "add" and call["result"] == "5"
    assert out.choices[0].message.content == "2 + 3 = 5."


def test_64_concurrent_streams(live):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model="tiny", messages=ask(f"hi {i}"), max_tokens=6, temperature=0, stream=True
        )
        text, reason = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
        return text, reason

    async def main() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(reason in ("length", "stop") for _, reason in results)
    assert sum(bool(text) for text, _ in results) >= 32
