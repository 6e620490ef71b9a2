"""The hostile-input fault suite: what an attacker can send through the API.

Each case is sent to a live server on loopback (a tiny model, a small body limit) and must
get a 4xx in OpenAI's error shape that names the parameter at fault, or be handled cleanly;
afterwards the server must still answer a normal request and hold no KV blocks. No case may
give a 5xx, wedge the engine thread or leave a request in flight.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.polling import wait_until
from tests.server.conftest import API_KEY, live_server

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
MAX_BODY_KB = 512


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    yield from live_server(tmp_path_factory, max_body_kb=MAX_BODY_KB)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(server, body: dict | bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=HEADERS, timeout=60)


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": ask("hi"), "max_tokens": 2, **fields}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tool(parameters: dict, name: str = "deep") -> dict:
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": parameters}}


def with_call(arguments: str) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        *ask("x"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


def assert_still_serves(hostile) -> None:
    """The next ordinary request is answered normally and nothing is left behind."""
    server, engine = hostile
    r = post(server, chat())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    state = server.app.state.conveyor
    assert wait_until(lambda: state.num_pending == 0 and not engine.has_unfinished)
    assert engine.block_manager.num_used_blocks == 0
    assert httpx.get(server.url + "/health").status_code == 200


CASES = {
    # (body, status, param the error must name, words the message must contain)
    "surrogate in content": (chat(messages=ask("a\ud800b")), 400, "messages.0.content", "surrogate"),
    "surrogate in a key": (
        chat(messages=[{"role": "user", "content": "x", "\udfff": 1}]),
        400,
        "messages.0",
        "surrogate",
    ),
    "surrogate in a schema": (
        chat(tools=[tool({"type": "object", "description": "\ud800"})]),
        400,
        "tools.0.function.parameters.description",
        "surrogate",
    ),
    "escaped surrogate in arguments": (
        chat(messages=with_call('{"a": "\\ud800"}')),
        400,
        "messages.1.tool_calls.0.function.arguments",
        "surrogate",
    ),
    "schema nested 300 deep": (chat(tools=[tool(nested(300))]), 400, "tools.0.function.parameters", "deeper"),
    "schema nested 40 deep": (
        chat(tools=[tool(nested(20))]),
        400,
        "tools.0.function.parameters",
        "deeper than 32",
    ),
    "schema too large": (
        chat(tools=[tool({"type": "object", "description": "x" * 70_000})]),
        400,
        "tools.0.function.parameters",
        "characters",
    ),
    "too many tools": (
        chat(tools=[tool({"type": "object"}, f"t{i}") for i in range(129)]),
        400,
        "tools",
        "128",
    ),
    "arguments of 100,000 [": (
        chat(messages=with_call("[" * 100_000)),
        400,
        "messages.1.tool_calls.0.function.arguments",
        "deeper",
    ),
    "arguments too long": (
        chat(messages=with_call(json.dumps({"a": "x" * 270_000}))),
        400,
        "messages.1.tool_calls.0.function.arguments",
        "limit",
    ),
    "max_tokens as a string": (chat(max_tokens="10"), 400, "max_tokens", "integer"),
    "stream as a string": (chat(stream="yes"), 400, "stream", "boolean"),
    "temperature as a string": (chat(temperature="1"), 400, "temperature", "number"),
    "max_tokens 10**30": (chat(max_tokens=10**30), 400, "max_tokens", "context"),
    "max_completion_tokens past the context": (
        chat(max_completion_tokens=513),
        400,
        "max_completion_tokens",
        "context",
    ),
    "too many stop strings": (chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", "at most 16"),
    "a long stop string": (chat(stop="x" * 257), 400, "stop", "limit is 256"),
    "image content part": (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages.0.content",
        "text content parts",
    ),
    "text part without text": (
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "messages.0.content",
        "text",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_400_naming_the_parameter(hostile, case):
    body, status, param, words = CASES[case]
    r = post(hostile[0], body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert words in error["message"], error
    assert_still_serves(hostile)


def test_completions_are_checked_too(hostile):
    server = hostile[0]
    for body, param in [
        ({"model": "tiny", "prompt": "a\ud800", "max_tokens": 2}, "prompt"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 10**30}, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "max_tokens": "2"}, "max_tokens"),
    ]:
        r = post(server, body, "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
    assert_still_serves(hostile)


def test_body_past_the_limit_is_413(hostile):
    server = hostile[0]
    big = chat(messages=ask("x" * (MAX_BODY_KB * 1024 + 1)))
    r = post(server, big)
    assert r.status_code == 413 and r.json()["error"]["message"], r.text

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=HEADERS, timeout=60)
    assert r.status_code == 413, r.text
    assert_still_serves(hostile)


def test_malformed_and_deep_json_bodies(hostile):
    server = hostile[0]
    for body in [
        b'{"model": "tiny", "messages": [' + b"[" * 100_000,
        b'{"model": "tiny", "messages": ',
        b"\xff\xfe not json",
        b'"just a string"',
        b"[]",
    ]:
        r = post(server, body)
        assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text[:200])
        assert r.json()["error"]["message"]
    assert_still_serves(hostile)


def test_non_streamed_disconnect_aborts_the_request(hostile):
    server, engine = hostile
    state = server.app.state.conveyor
    pool = engine.driver.executor.pool
    body = json.dumps({"model": "tiny", "messages": ask("script:slow")}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    abandoned = []
    for _ in range(2):  # abandoned requests must not keep holding their places (2 workers)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(head + body)
        abandoned.append(sock)
    assert wait_until(lambda: pool.num_busy == 2), "the slow calls did not start"
    for sock in abandoned:
        sock.close()
    assert wait_until(lambda: state.num_pending == 0)
    assert wait_until(lambda: not engine.has_unfinished and engine.block_manager.num_used_blocks == 0)
    assert wait_until(lambda: pool.num_busy == 0)
    assert_still_serves(hostile)
