"""Tool sources that fail are loud: `conveyor serve` (a subprocess) exits non-zero with the
error of an MCP server or `--tools` spec that fails at start; with `--allow-missing-tools` it
starts without it and /health says so; an MCP server that dies later shows in /health and its
tools answer with an error result that says so."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading

import httpx
import pytest

from tests.server.conftest import MCP_COMMAND
from tests.tiny import build_tiny_model

START_TIMEOUT_S = 240  # a cold start under load: imports, the model, the tool workers
CRASHING = f"{MCP_COMMAND} --crash-at-start"
MORTAL = f"{MCP_COMMAND} --mortal"


def serve(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from conveyor.cli import main; sys.exit(main())", "serve"]
    return subprocess.Popen(
        [*command, "--port", "0", "--served-model-name", "tiny", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_mcp_server_that_crashes_at_start_stops_serve_with_its_error():
    server = serve("--model", "unused", "--mcp", CRASHING)
    try:
        _, stderr = server.communicate(timeout=START_TIMEOUT_S)
    finally:
        server.kill()
    assert server.returncode == 1
    assert "start-up failed" in stderr and "--crash-at-start" in stderr and "--allow-missing-tools" in stderr


def test_a_tools_module_that_fails_to_import_stops_serve_with_its_error():
    server = serve("--model", "unused", "--tools", "tests.server.no_such_module:tool")
    try:
        _, stderr = server.communicate(timeout=START_TIMEOUT_S)
    finally:
        server.kill()
    assert server.returncode == 1
    assert "tools: tests.server.no_such_module:tool" in stderr and "No module named" in stderr


class Running:
    """A `conveyor serve` subprocess read line by line (its URL from uvicorn's banner)."""

    def __init__(self, server: subprocess.Popen) -> None:
        self.server = server
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for(r"Uvicorn running on (http://\S+)")
        self._wait_for(r"(the engine is loaded)")

    def _read(self) -> None:
        for line in self.server.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for(self, pattern: str) -> str:
        while (line := self.lines.get(timeout=START_TIMEOUT_S)) is not None:
            self.log.append(line)
            if found := re.search(pattern, line):
                return found.group(1)
        raise AssertionError("serve ended before it listened:\n" + "".join(self.log))

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def call(self, tool: str) -> dict:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "tool_choice": {"type": "function", "function": {"name": tool}},
            "max_tokens": 300,  # the random model pads the forced call with blanks
            "temperature": 0,
        }
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120).json()


@pytest.fixture
def tolerant(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", "qwen2")
    server = serve(
        *("--model", str(model_dir), "--dtype", "float32", "--num-blocks", "128", "--block-size", "4"),
        *("--num-workers", "1", "--max-tool-rounds", "1", "--allow-missing-tools"),
        *("--mcp", CRASHING, MORTAL),
    )
    try:
        yield Running(server)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_allow_missing_tools_starts_without_it_and_health_tracks_a_source_that_dies(tolerant):
    health = tolerant.health()
    assert health["status"] == "ok" and list(health["tools"]["missing"]) == [f"mcp: {CRASHING}"]
    assert any("serving without the tool source" in line for line in tolerant.log)  # the log says so
    assert health["tools"]["failing"] == {}
    died = tolerant.call("die")["choices"][0]["message"]["server_tool_calls"]
    assert died[0]["function"]["name"] == "die" and "tool source unavailable" in died[0]["result"]
    assert list(tolerant.health()["tools"]["failing"]) == [f"mcp: {MORTAL}"]
    added = tolerant.call("add")["choices"][0]["message"]["server_tool_calls"]
    assert added[0]["function"]["name"] == "add" and "unavailable" not in added[0]["result"]
    assert tolerant.health()["tools"]["failing"] == {}  # it answers again: no longer failing
