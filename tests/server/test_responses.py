"""/v1/responses through the official openai client against a live server (scripted turns)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from conveyor.config import EngineConfig, ModelConfig, ServerConfig
from conveyor.server.client import EngineClient
from conveyor.server.serve import ServerThread, build_app
from tests.polling import wait_until
from tests.server.conftest import API_KEY, SCRIPTS
from tests.server.test_engine_faults import FaultyEngine

SCRIPTS.update(
    {
        "resp:hello": ["Hello from the script."],
        "resp:again": ["Again, hello."],
    }
)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _idle(engine) -> None:
    """No request left once the responses are in, and no blocks held but those kept for a
    client-tool follow-up (sessions, freed by their TTL)."""
    stats = engine.stats()
    assert stats.num_used_blocks == stats.num_session_blocks and not engine.has_unfinished


def test_text(client, live):
    r = client.responses.create(model="tiny", input="resp:hello", temperature=0)
    assert r.status == "completed" and r.object == "response"
    assert r.output_text == "Hello from the script."
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.usage.output_tokens == len(live[1].tokenizer.encode("Hello from the script.")) + 1
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    with_instructions = client.responses.create(
        model="tiny", input="resp:hello", instructions="Answer in French, please."
    )
    assert with_instructions.instructions == "Answer in French, please."
    assert with_instructions.usage.input_tokens > r.usage.input_tokens  # a system message in front
    _idle(live[1])


def test_function_tool_round_trip(client):
    first = client.responses.create(model="tiny", input="script:weather", tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "c"}
    history = [{"role": "user", "content": "script:weather"}, *[i.model_dump() for i in first.output]]
    follow_up = client.responses.create(
        model="tiny",
        tools=[WEATHER],
        input=[*history, {"type": "function_call_output", "call_id": call.call_id, "output": "22C"}],
    )
    assert follow_up.output_text == "It is 22C in Paris."


def test_previous_response_id(client):
    first = client.responses.create(model="tiny", input="script:weather", tools=[WEATHER])
    [call] = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22C"}
    follow_up = client.responses.create(
        model="tiny", tools=[WEATHER], previous_response_id=first.id, input=[result]
    )
    assert follow_up.previous_response_id == first.id
    assert follow_up.output_text == "It is 22C in Paris."
    # the prompt is the stored conversation: the same as the history sent in full
    history = [{"role": "user", "content": "script:weather"}, *[i.model_dump() for i in first.output]]
    replayed = client.responses.create(model="tiny", tools=[WEATHER], input=[*history, result])
    assert follow_up.usage.input_tokens == replayed.usage.input_tokens
    # exact continuation: the first turn's tokens are reused, not re-rendered; all but the
    # end-of-turn token it sampled (never run, so it has no KV) come from the cache
    repeated = first.usage.input_tokens + first.usage.output_tokens
    assert follow_up.usage.input_tokens_details.cached_tokens == repeated - 1
    alone = client.responses.create(model="tiny", tools=[WEATHER], input=[result])
    assert alone.usage.input_tokens < follow_up.usage.input_tokens
    again = client.responses.create(model="tiny", previous_response_id=follow_up.id, input="resp:again")
    assert again.output_text == "Again, hello."
    replayed = client.responses.create(
        model="tiny",
        input=[
            *history,
            result,
            *[i.model_dump() for i in follow_up.output],
            {"role": "user", "content": "resp:again"},
        ],
    )
    assert again.usage.input_tokens == replayed.usage.input_tokens


def test_instructions_are_not_carried_over(client):
    first = client.responses.create(model="tiny", input="resp:hello", instructions="Be brief.")
    again = client.responses.create(model="tiny", input="resp:again", previous_response_id=first.id)
    history = [{"role": "user", "content": "resp:hello"}, *[i.model_dump() for i in first.output]]
    replayed = client.responses.create(
        model="tiny", input=[*history, {"role": "user", "content": "resp:again"}]
    )
    assert again.instructions is None and again.output_text == "Again, hello."
    assert again.usage.input_tokens == replayed.usage.input_tokens


def test_server_tool_is_its_own_item(client):
    r = client.responses.create(model="tiny", input="script:lookup")
    assert [i.type for i in r.output] == ["mcp_call", "message"]
    server_call = r.output[0]
    assert server_call.name == "lookup" and server_call.server_label == "conveyor"
    assert json.loads(server_call.arguments) == {"key": "k1"} and server_call.output == "value-of-k1"
    assert r.output_text == "The value is value-of-k1."
    # the server call's item goes back as input, and its stored form continues the conversation
    again = client.responses.create(model="tiny", previous_response_id=r.id, input="resp:again")
    assert again.output_text == "Again, hello."
    replayed = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": "script:lookup"}, *[i.model_dump() for i in r.output]]
        + [{"role": "user", "content": "resp:again"}],
    )
    assert replayed.usage.input_tokens == again.usage.input_tokens  # the same conversation


def test_stream_helper(client):
    with client.responses.stream(model="tiny", input="resp:hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hello from the script."
    assert final.usage.output_tokens > 0


def test_stream_raw_function_call(client, live):
    events = list(client.responses.create(model="tiny", input="script:weather", tools=[WEATHER], stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(args) == json.loads(done.arguments) == {"city": "Paris", "unit": "c"}
    assert done.name == "get_weather"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.status) for i in added] == [("function_call", "in_progress")]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].arguments == done.arguments
    _idle(live[1])


def test_stream_server_tool(client):
    events = list(client.responses.create(model="tiny", input="script:lookup", stream=True))
    kinds = [e.type for e in events]
    assert "response.mcp_call.completed" in kinds
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["mcp_call", "message"] and done[0].output == "value-of-k1"


def test_max_output_tokens(client):
    r = client.responses.create(model="tiny", input="resp:hello", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2


def _gauge(live, name: str) -> float:
    text = httpx.get(live[0].url + "/metrics").text
    [line] = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_stored_get_and_delete(client, live):
    r = client.responses.create(model="tiny", input="resp:hello")
    assert client.responses.retrieve(r.id).output_text == r.output_text
    assert _gauge(live, "conveyor_response_store_bytes") > 0
    entries = _gauge(live, "conveyor_response_store_entries")
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert _gauge(live, "conveyor_response_store_entries") == entries - 1
    unstored = client.responses.create(model="tiny", input="resp:hello", store=False)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="resp:again", previous_response_id=unstored.id)
    assert e.value.body["code"] == "previous_response_not_found"
    assert e.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "json_schema", "name": "f", "schema": {"not": {}}}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": []}, "input"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
    ],
)
def test_unsupported_is_400_naming_it(live, extra, param):
    server, engine = live
    body = {"model": "tiny", "input": "resp:hello", **extra}
    r = httpx.post(
        server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error
    _idle(engine)


def test_neutral_values_are_accepted(client):
    r = client.responses.create(
        model="tiny",
        input="resp:hello",
        include=[],
        truncation="disabled",
        reasoning=None,
        metadata={"k": "v"},
    )
    assert r.status == "completed" and r.metadata == {"k": "v"}


def test_tool_choice(client):
    none = client.responses.create(model="tiny", input="script:weather", tools=[WEATHER], tool_choice="none")
    assert [i.type for i in none.output] == ["message"] and none.tool_choice == "none"
    assert "<tool_call>" in none.output_text  # no tools offered: the forced call is only text
    named = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model="tiny", input="script:weather", tools=[WEATHER], tool_choice=named)
    assert [i.type for i in r.output] == ["function_call"] and r.tool_choice.name == "get_weather"


def test_parallel_tool_calls(client):
    both = client.responses.create(model="tiny", input="script:two-calls", tools=[WEATHER])
    assert [json.loads(i.arguments)["city"] for i in both.output] == ["Rome", "Oslo"]
    one = client.responses.create(
        model="tiny", input="script:two-calls", tools=[WEATHER], parallel_tool_calls=False
    )
    assert [json.loads(i.arguments)["city"] for i in one.output] == ["Rome"]
    assert one.parallel_tool_calls is False and one.status == "completed"


def test_async_client(live):
    async def run() -> str:
        async with openai.AsyncOpenAI(
            base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0
        ) as aclient:
            first = await aclient.responses.create(model="tiny", input="resp:hello")
            again = await aclient.responses.create(
                model="tiny", input="resp:again", previous_response_id=first.id
            )
            return again.output_text

    assert asyncio.run(run()) == "Again, hello."


def test_disconnect_mid_stream_aborts_and_frees(live):
    server, engine = live
    body = {"model": "tiny", "input": "script:slow", "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line == "event: response.mcp_call_arguments.done":
                break  # the call is out; its tool is running
    pool = engine.driver.executor.pool
    assert wait_until(lambda: server.app.state.conveyor.num_pending == 0)
    assert wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished)
    assert wait_until(lambda: pool.num_busy == 0)


@pytest.fixture
def faulty():
    """A server over a stand-in engine that fails on cue (test_engine_faults.py)."""
    config = EngineConfig(model=ModelConfig(model="unused"))
    app = build_app(
        config, ServerConfig(served_model_name="m"), lambda: (EngineClient(FaultyEngine()), {}, "hermes")
    )
    with ServerThread(app) as server:
        yield server


def test_an_engine_fault_fails_the_response(faulty):
    server = faulty
    body = {"model": "m", "input": "bad-step"}
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 500 and "injected step fault" in r.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=30) as r:
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in data] == ["response.created", "response.in_progress", "response.failed"]
    failed = data[-1]["response"]
    assert failed["status"] == "failed" and "injected step fault" in failed["error"]["message"]
    ok = httpx.post(server.url + "/v1/responses", json={"model": "m", "input": "hello"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["status"] == "incomplete"  # the stand-in stops by length


def test_too_long_a_prompt_is_a_400_and_leaves_nothing(client, live):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x" * 2000)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="resp:hello", max_output_tokens=10_000)
    assert e.value.body["param"] == "max_output_tokens"
    assert live[0].app.state.conveyor.num_pending == 0
    _idle(live[1])


class Forecast(BaseModel):
    city: str
    days: int


def test_text_format_json_schema_parses(client, live):
    """`text.format` json_schema is enforced as chat's response_format; `responses.parse` reads it."""
    out = client.responses.parse(model="tiny", input="script:json", text_format=Forecast)
    assert out.output_parsed == Forecast(city="Paris", days=2)
    _idle(live[1])


def test_text_format_json_object_forces_an_object(client, live):
    """Unscripted, the random model's reply is still one JSON object: the grammar wrote it."""
    out = client.responses.create(
        model="tiny", input="anything", text={"format": {"type": "json_object"}}, max_output_tokens=200
    )
    if out.status == "completed":
        assert isinstance(json.loads(out.output_text), dict)
    else:  # cut by max_output_tokens: still the start of an object
        assert out.output_text.lstrip().startswith("{")
    _idle(live[1])
