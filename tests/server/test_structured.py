"""Structured outputs: `response_format` json_object / json_schema through the `openai` client
(`parse` with a pydantic model, streams) and LangChain's `with_structured_output`, enforced by
the same xgrammar machinery as tool calls; bad formats and unenforceable schemas get a 400
that names them."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.server.conftest import API_KEY, live_server

FORECAST = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    days: int


def schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    yield from live_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_clean(live) -> None:
    _, engine = live
    assert not engine.has_unfinished and engine.block_manager.num_used_blocks == 0


def test_parse_with_a_pydantic_model(live, client):
    out = client.chat.completions.parse(model="tiny", messages=ask("script:json"), response_format=Forecast)
    assert out.choices[0].message.parsed == Forecast(city="Paris", days=2)
    assert not out.choices[0].message.model_extra.get("server_tool_calls")  # no server tools offered
    assert_clean(live)


@pytest.mark.parametrize(("temperature", "seed"), [(0, None), (1, 1), (1.5, 2)])
def test_the_grammar_makes_a_random_model_fit_the_schema(live, client, temperature, seed):
    out = client.chat.completions.create(
        model="tiny",
        messages=ask("forecast please"),
        response_format=schema_format(FORECAST, strict=seed != 1),
        temperature=temperature,
        seed=seed,
        max_tokens=120,
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), FORECAST)
    streamed = client.chat.completions.create(
        model="tiny",
        messages=ask("forecast please"),
        response_format=schema_format(FORECAST),
        temperature=temperature,
        seed=seed,
        max_tokens=120,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), FORECAST)
    assert_clean(live)


def test_json_object_is_an_object(live, client):
    out = client.chat.completions.create(
        model="tiny", messages=ask("script:json"), response_format={"type": "json_object"}
    )
    assert json.loads(out.choices[0].message.content) == {"city": "Paris", "days": 2}
    free = client.chat.completions.create(
        model="tiny", messages=ask("any object"), response_format={"type": "json_object"}, max_tokens=400
    )
    if free.choices[0].finish_reason == "stop":  # a random model may write a long object
        assert isinstance(json.loads(free.choices[0].message.content), dict)
    else:
        assert free.choices[0].message.content.lstrip().startswith("{")
    assert_clean(live)


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        ({"type": "sound"}, "sound"),
        ({"type": "json_schema"}, "json_schema"),
        (schema_format({"type": "object", "not": {"required": ["a"]}}), "'not'"),
        (
            schema_format({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
            "'uniqueItems'",
        ),
        (schema_format({"allOf": [{"type": "integer"}, {"minimum": 3}]}), "'allOf'"),
        (schema_format({"type": "string", "format": "phone"}), "format: phone"),
        (schema_format({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}), "properties.a"),
    ],
)
def test_bad_or_unenforceable_formats_are_400_naming_them(live, client, response_format, named):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask("hi"), response_format=response_format)
    assert e.value.body["param"].startswith("response_format") and named in e.value.body["message"]
    assert_clean(live)


def test_response_format_with_tools_is_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=ask("hi"), tools=[tool], response_format={"type": "json_object"}
        )
    assert e.value.body["param"] == "response_format"


def test_langchain_with_structured_output(live):
    model = ChatOpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, model="tiny", max_retries=0)
    assert model.with_structured_output(Forecast).invoke("script:json") == Forecast(city="Paris", days=2)
    as_json = model.with_structured_output(Forecast, method="json_mode").invoke("script:json")
    assert as_json == Forecast(city="Paris", days=2)
    assert_clean(live)
