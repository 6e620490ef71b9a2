"""tool_choice "required" and a named function through the openai client: the calls come
from the tool-call grammar (a random model never writes one by itself), stream as OpenAI
deltas and fit the tool's schema. The server here has no server tools, so every call
offered is the client's."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from conveyor.config import ServerConfig, ToolConfig
from conveyor.server.client import EngineClient
from conveyor.server.serve import ServerThread, build_app
from tests.server.conftest import _engine_with
from tests.tiny import build_tiny_model

FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ALERT = {
    "type": "function",
    "function": {
        "name": "alert",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (FORECAST, ALERT)}
NAMED = {"type": "function", "function": {"name": "forecast"}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")
    engine = _engine_with(model_dir, ToolConfig(), [])
    app = build_app(
        engine.config, ServerConfig(served_model_name="tiny"), lambda: (EngineClient(engine), {}, "hermes")
    )
    with ServerThread(app) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def streamed_calls(chunks: list) -> dict[int, dict]:
    """index -> {"id", "name", "arguments"} joined from the tool_calls deltas (OpenAI's rules:
    id and name only on an entry's first delta)."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for e in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if e.index not in calls:
                assert e.id and e.function.name, "an entry's first delta carries its id and name"
                calls[e.index] = {"id": e.id, "name": e.function.name, "arguments": ""}
            else:
                assert e.id is None and e.function.name is None
            calls[e.index]["arguments"] += e.function.arguments or ""
    return calls


@pytest.mark.parametrize(("temperature", "seed"), [(0, None), (1, 1), (1, 2)])
def test_named_function_streams_one_call_that_fits_the_schema(client, temperature, seed):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=ask("forecast, please"),
            tools=[FORECAST, ALERT],
            tool_choice=NAMED,
            temperature=temperature,
            seed=seed,
            max_tokens=200,
            stream=True,
        )
    )
    calls = streamed_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "forecast"
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["forecast"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


@pytest.mark.parametrize(("seed", "lenient"), [(1, False), (2, False), (3, False), (1, True), (4, True)])
def test_required_calls_offered_tools(client, seed, lenient):
    """The grammar writes only tagged calls of offered tools, a subset of what the parser reads,
    lenient (fences, bare JSON) or not: no text, no call of another name, can come out."""
    out = client.chat.completions.create(
        model="tiny",
        messages=ask("anything"),
        tools=[FORECAST, ALERT],
        tool_choice="required",
        temperature=1,
        seed=seed,
        max_tokens=300,
        extra_body={"lenient_tool_calls": lenient},
    )
    choice = out.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length")
    assert {c.function.name for c in calls} <= set(SCHEMAS)
    rest = (choice.message.content or "").strip()  # blank, or the start of a call "length" cut off
    assert not rest or (choice.finish_reason == "length" and rest.startswith("<tool_call>"))
    for call in calls if choice.finish_reason == "tool_calls" else calls[:-1]:  # "length" may cut the last
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_without_parallel_calls_stops_after_one(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=ask("anything"),
            tools=[FORECAST, ALERT],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=300,
            stream=True,
        )
    )
    calls = streamed_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] in SCHEMAS
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_named_function_of_no_offered_tool_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask("x"), tools=[ALERT], tool_choice=NAMED)
    assert e.value.body["param"] == "tool_choice"
