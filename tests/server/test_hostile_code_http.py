"""Hostile tool code end to end: `conveyor serve --tools python` over HTTP, with the model's
calls scripted. The code tries the report's escapes from inside a server request (the server's
secret in its environment and in /proc, the server's own loopback port, the forkserver's
socket directory, /etc/shadow, a write outside the sandbox); each must fail, the refusals come
back as the call's result, and the server goes on answering with nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

from tests.polling import wait_until
from tests.server.conftest import API_KEY, SCRIPTS, TOOLS, live_server

SECRET = f"sk-http-hostile-{os.getpid()}"


def _call(code: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "python", "arguments": {"code": code}}) + "\n</tool_call>"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    os.environ["CONVEYOR_API_KEY"] = SECRET  # what a server started with a key holds
    outside = tmp_path_factory.mktemp("outside") / "written"
    try:
        served = live_server(tmp_path_factory, tools=(*TOOLS, "python"))
        try:
            server, engine = next(served)
        except RuntimeError as e:
            if "needs an isolated sandbox" in str(e):
                pytest.skip(str(e))
            raise
    finally:
        del os.environ["CONVEYOR_API_KEY"]
    port = int(server.url.rsplit(":", 1)[1])
    code = f"import tests.server.hostile_probe as p\np.run({SECRET!r}, {port}, {str(outside)!r})"
    SCRIPTS["script:hostile-python"] = [_call(code), "Done."]
    yield server, engine, outside
    del SCRIPTS["script:hostile-python"]
    served.close()


def test_hostile_code_through_the_api_is_refused_and_the_server_goes_on(live) -> None:
    server, engine, outside = live
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "script:hostile-python"}], max_tokens=300
    )
    calls = answer.choices[0].message.model_extra["server_tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["python"]
    lines = dict(line.split(" ", 1) for line in calls[0]["result"].splitlines())
    assert lines["environ"] == "False" and lines["proc"] == "False" and lines["cmdline"] == "False", lines
    assert lines["loopback"].startswith("refused"), lines
    assert lines["forkserver"] == "[] []", lines
    assert lines["shadow"].startswith("refused") and lines["write"].startswith("refused"), lines
    assert not Path(outside).exists()
    assert SECRET not in calls[0]["result"] and SECRET not in (answer.choices[0].message.content or "")
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert again.choices[0].finish_reason in ("stop", "length")
    assert wait_until(lambda: not engine.has_unfinished and engine.block_manager.num_used_blocks == 0)
