"""The session id a client names (X-Session-Id, metadata.session_id, user) reaches the engine's
request, through the official openai client; without one, a conversation's turns share the
hash of its opening."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from conveyor.config import ServerConfig, ToolConfig
from conveyor.server.client import EngineClient
from conveyor.server.serve import ServerThread, build_app
from tests.server.conftest import _engine_with
from tests.tiny import build_tiny_model


class Recording:
    """The engine, noting each request's session id as the scheduler sees it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sessions: list[str | None] = []

    def add_request(self, prompt: Any, params: Any = None, **options: Any) -> str:
        request_id = self.engine.add_request(prompt, params, **options)
        self.sessions.append(self.engine.get_request(request_id).session_id)
        return request_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")
    engine = Recording(_engine_with(model_dir, ToolConfig(num_workers=1), []))
    app = build_app(
        engine.config, ServerConfig(served_model_name="tiny"), lambda: (EngineClient(engine), {}, "hermes")
    )
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        yield client, engine


def ask(client: openai.OpenAI, messages: list[dict] | None = None, **extra: Any) -> None:
    messages = messages or [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, **extra)


def test_header_then_metadata_then_user_name_the_session(served) -> None:
    client, engine = served
    ask(client, extra_headers={"X-Session-Id": "from-header"}, metadata={"session_id": "m"}, user="u")
    ask(client, metadata={"session_id": "from-metadata"}, user="u")
    ask(client, user="from-user")
    client.completions.create(model="tiny", prompt="hi", max_tokens=2, user="completion-user")
    assert engine.sessions[-4:] == ["from-header", "from-metadata", "from-user", "completion-user"]


def test_a_conversation_s_turns_share_the_hash_of_its_opening(served) -> None:
    client, engine = served
    opening = [{"role": "system", "content": "s"}, {"role": "user", "content": "task one"}]
    ask(client, opening)
    ask(client, [*opening, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}])
    ask(client, [{"role": "system", "content": "s"}, {"role": "user", "content": "task two"}])
    first, follow_up, other = engine.sessions[-3:]
    assert first and first.startswith("prefix:") and first == follow_up and other != first


def test_an_overlong_session_id_is_refused(served) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="X-Session-Id"):
        ask(client, extra_headers={"X-Session-Id": "x" * 600})
    with pytest.raises(openai.BadRequestError, match="user"):
        ask(client, user="x" * 600)
