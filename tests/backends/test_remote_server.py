"""`conveyor serve --backend URL` end to end: the HTTP server opens a RemoteEngine through
open_engine and streams the remote engine's text back in OpenAI chunks."""

from __future__ import annotations

import json

import httpx
import pytest

from conveyor.config import BackendConfig, EngineConfig, ModelConfig, ServerConfig
from conveyor.server.serve import ServerThread, build_app, engine_loader
from tests.backends.fake_server import FakeEngine, Reply, chunks_of
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    fake = FakeEngine()
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")
    config = EngineConfig(model=ModelConfig(model=str(model_dir)), backend=BackendConfig(backend=fake.url))
    server = ServerConfig(served_model_name="tiny")
    with ServerThread(build_app(config, server, engine_loader(config, server))) as thread:
        yield thread, fake
    fake.close()


def test_a_chat_completion_streams_from_the_remote_engine(served) -> None:
    thread, fake = served
    fake.reset(Reply(chunks_of("Hello from afar.")))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{thread.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = [
            json.loads(line[5:])
            for line in response.iter_lines()
            if line.startswith("data:") and line.strip() != "data: [DONE]"
        ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == "Hello from afar."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "stop"
    assert fake.bodies[0]["prompt"].endswith("hi<|im_end|>\n<|im_start|>assistant\n")
