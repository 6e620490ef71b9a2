"""Auth, OpenAI-shaped errors, the pending bound, loading, and disconnects mid-stream."""

from __future__ import annotations

import dataclasses
import threading

import httpx
import openai
import pytest

from conveyor.config import ServerConfig
from conveyor.server.serve import ServerThread, build_app
from tests.polling import wait_until
from tests.server.conftest import API_KEY


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_auth(live):
    bad = openai.OpenAI(base_url=live[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(live[0].url + "/v1/chat/completions", json={}).status_code == 401


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"temperature": 5}, 400),
        ({"n": 9}, 400),  # past --max-n
        ({"messages": []}, 400),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
        ({"messages": ask("x" * 5000)}, 400),  # longer than the model's 512 positions
        ({"model": "gpt-4"}, 404),
    ],
)
def test_errors_have_openai_shape(live, client, kwargs, status):
    args = {"model": "tiny", "messages": ask("hi"), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    assert set(e.value.body) >= {"message", "type"} and e.value.body["message"]
    _, engine = live
    assert engine.block_manager.num_used_blocks == 0


def test_queue_full_is_429(live, client):
    server, _ = live
    state = server.app.state.conveyor
    config = state.config
    state.config = dataclasses.replace(config, max_pending=1)
    body = {"model": "tiny", "messages": ask("script:slow"), "stream": True}
    try:
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r:
            lines = r.iter_lines()  # kept open: dropping the iterator closes the connection
            next(lines)  # accepted: one request in flight
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
            assert e.value.body["code"] == "queue_full"
    finally:
        state.config = config
    assert wait_until(lambda: state.num_pending == 0)


def test_503_while_loading():
    gate = threading.Event()

    def load():
        gate.wait(30)
        raise RuntimeError("no model today")

    app = build_app(_config(), ServerConfig(served_model_name="x"), load)
    server = ServerThread(app)
    server._thread.start()
    try:
        assert server._started.wait(30)
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "x", "messages": ask("hi")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert httpx.get(server.url + "/health").status_code == 503
        gate.set()
        assert app.state.conveyor.loaded.wait(30)
        assert "no model today" in httpx.get(server.url + "/health").json()["error"]
    finally:
        gate.set()
        server.stop()


def _config():
    from conveyor.config import EngineConfig, ModelConfig

    return EngineConfig(model=ModelConfig(model="unused"))


def test_disconnect_mid_stream_aborts_and_frees(live):
    server, engine = live
    body = {"model": "tiny", "messages": ask("script:slow"), "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if '"name": "slow"' in line:
                break  # the call is out; its tool is running
    pool = engine.driver.executor.pool
    assert wait_until(lambda: server.app.state.conveyor.num_pending == 0)
    assert wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished)
    assert wait_until(lambda: pool.num_busy == 0)
