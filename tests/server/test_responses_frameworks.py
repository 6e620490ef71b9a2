"""Agent frameworks on /v1/responses against a live server (scripted turns): the OpenAI Agents
SDK's default `OpenAIResponsesModel` and pydantic-ai's `OpenAIResponsesModel` each run a
tool-calling agent end to end: the model calls get_weather, the framework runs it, and the
model's answer uses its result. Tracing and telemetry off; nothing leaves loopback."""

from __future__ import annotations

import asyncio

import agents
import pydantic_ai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic_ai.models.openai import OpenAIResponsesModel as PydanticResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.server.conftest import API_KEY, SCRIPTS

agents.set_tracing_disabled(True)
SCRIPTS.setdefault("resp:again", ["Again, hello."])


def _weather(calls: list[tuple[str, str]]):
    def get_weather(city: str, unit: str) -> str:
        """Weather of a city."""
        calls.append((city, unit))
        return "22C"

    return get_weather


@pytest.fixture
def base_url(live):
    return live[0].url + "/v1"


def test_agents_sdk_tool_agent(base_url, live):
    calls: list[tuple[str, str]] = []
    client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather.",
        tools=[agents.function_tool(_weather(calls))],
        model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
    )
    result = asyncio.run(agents.Runner.run(agent, "script:weather"))
    assert calls == [("Paris", "c")]
    assert result.final_output == "It is 22C in Paris."
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    assert result.context_wrapper.usage.requests == 2
    stats = live[1].stats()
    assert stats.num_used_blocks == stats.num_session_blocks  # kept for a follow-up only


def test_agents_sdk_streamed(base_url):
    calls: list[tuple[str, str]] = []
    client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    agent = agents.Agent(
        name="weather",
        tools=[agents.function_tool(_weather(calls))],
        model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
    )

    async def run() -> tuple[object, list[str]]:
        streamed = agents.Runner.run_streamed(agent, "script:weather")
        deltas = [
            e.data.delta
            async for e in streamed.stream_events()
            if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
        ]
        return streamed, deltas

    streamed, deltas = asyncio.run(run())
    assert calls == [("Paris", "c")]
    assert streamed.final_output == "".join(deltas) == "It is 22C in Paris."


def test_pydantic_ai_tool_agent(base_url, live):
    calls: list[tuple[str, str]] = []
    model = PydanticResponsesModel("tiny", provider=OpenAIProvider(base_url=base_url, api_key=API_KEY))
    agent = pydantic_ai.Agent(model, tools=[_weather(calls)], instructions="Answer with the weather.")
    result = agent.run_sync("script:weather")
    assert calls == [("Paris", "c")]
    assert result.output == "It is 22C in Paris."
    assert result.usage.requests == 2
    stats = live[1].stats()
    assert stats.num_used_blocks == stats.num_session_blocks  # kept for a follow-up only


def test_pydantic_ai_streamed(base_url):
    calls: list[tuple[str, str]] = []
    model = PydanticResponsesModel("tiny", provider=OpenAIProvider(base_url=base_url, api_key=API_KEY))
    agent = pydantic_ai.Agent(model, tools=[_weather(calls)])

    async def run() -> str:
        async with agent.run_stream("script:weather") as streamed:
            return await streamed.get_output()

    assert asyncio.run(run()) == "It is 22C in Paris."
    assert calls == [("Paris", "c")]


def test_agents_sdk_leaves_server_tools_to_the_server(base_url):
    client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    agent = agents.Agent(name="lookup", model=agents.OpenAIResponsesModel(model="tiny", openai_client=client))
    result = asyncio.run(agents.Runner.run(agent, "script:lookup"))
    assert result.final_output == "The value is value-of-k1."
    [server_call] = [i.raw_item for i in result.new_items if type(i).__name__ == "ToolCallItem"]
    assert server_call.type == "mcp_call" and server_call.output == "value-of-k1"
    assert result.context_wrapper.usage.requests == 1  # the server ran it: no second round trip


def test_pydantic_ai_leaves_server_tools_to_the_server(base_url):
    model = PydanticResponsesModel("tiny", provider=OpenAIProvider(base_url=base_url, api_key=API_KEY))
    result = pydantic_ai.Agent(model).run_sync("script:lookup")
    assert result.output == "The value is value-of-k1."
    assert result.usage.requests == 1
    call, returned, _ = result.all_messages()[
        -1
    ].parts  # the server's call, as a provider-run (native) tool's
    assert type(call).__name__ == "NativeToolCallPart" and call.tool_name == "mcp_server:conveyor"
    assert returned.content["output"] == "value-of-k1"


def test_agents_sdk_chains_responses(base_url):
    """The SDK's response chaining: within a run (the tool's output goes with the previous
    response's id, not the history) and across runs (`previous_response_id`)."""
    calls: list[tuple[str, str]] = []
    client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    agent = agents.Agent(
        name="weather",
        tools=[agents.function_tool(_weather(calls))],
        model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
    )

    async def run() -> tuple[agents.RunResult, agents.RunResult]:
        first = await agents.Runner.run(agent, "script:weather", auto_previous_response_id=True)
        return first, await agents.Runner.run(
            agent, "resp:again", previous_response_id=first.last_response_id
        )

    first, again = asyncio.run(run())
    assert first.final_output == "It is 22C in Paris." and calls == [("Paris", "c")]
    assert again.final_output == "Again, hello."
    stored = OpenAI(base_url=base_url, api_key=API_KEY).responses.retrieve(first.last_response_id)
    assert stored.previous_response_id == first.raw_responses[0].response_id  # chained within the run
