"""A live server on loopback over a tiny random model whose replies are scripted."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from conveyor.config import ServerConfig, ToolConfig
from conveyor.engine.engine import PreparedPrompt
from conveyor.server.client import EngineClient
from conveyor.server.serve import ServerThread, build_app
from conveyor.tools.base import ToolRegistry
from conveyor.tools.mcp import mcp_tools
from tests.engine.scripted import script
from tests.tiny import build_tiny_model

API_KEY = "sk-test"
MCP_COMMAND = f"{sys.executable} {Path(__file__).with_name('mcp_server.py')}"
TOOLS = ("tests.server.tools:lookup", "tests.server.tools:slow", "tests.server.tools:record")


def _call(name: str, value: str, key: str = "key") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"{key}": "{value}"}}}}\n</tool_call>'


# the last message's content -> the model's turns (text the tiny model is forced to write)
SCRIPTS = {
    "script:weather": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    ],
    "22C": ["It is 22C in Paris."],
    "script:two-calls": [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        )
    ],
    "script:lookup": [
        '<tool_call>\n{"name": "lookup", "arguments": {"key": "k1"}}\n</tool_call>',
        "The value is value-of-k1.",
    ],
    "script:mcp": ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', "2 + 3 = 5."],
    "script:slow": ['<tool_call>\n{"name": "slow", "arguments": {"key": "k"}}\n</tool_call>', "done"],
    # three rounds of calls where max_tool_rounds is 2 (test_side_effects.py): the 3rd runs
    # (lookup) or not (record, external), is reported either way, and the model answers
    # without tools; "stubborn" calls again in that answer turn
    "script:three-lookups": [*(_call("lookup", f"k{i}") for i in range(3)), "Out of rounds."],
    "script:two-then-record": [
        *(_call("lookup", f"k{i}") for i in range(2)),
        _call("record", "r3"),
        "Out of rounds.",
    ],
    "script:stubborn": [_call("lookup", f"k{i}") for i in range(4)],
    "script:long-call": [_call("lookup", "k" * 40)],
    "script:mixed": [_call("lookup", "k1") + "\n" + _call("get_weather", "Paris", "city")],
    "script:unoffered": [_call("rm_rf", "/", "path"), "Sorry."],
    "script:json": ['{"city": "Paris", "days": 2}'],
    "script:fence": [
        (
            'Example:\n```json\n{"name": "record", "arguments": {"key": "fence"}}\n```\nOr bare:\n'
            '{"name": "record", "arguments": {"key": "bare"}}\nThat is all.'
        )
    ],
}


class ScriptedEngine:
    """An LLMEngine whose replies follow SCRIPTS (keyed by the last message); other prompts
    decode freely. Everything else is the wrapped engine's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def add_request(self, prompt: Any, params: Any = None, **options: Any) -> str:
        given = prompt.prompt if isinstance(prompt, PreparedPrompt) else prompt  # as the client sent it
        turns = (
            SCRIPTS.get(given[-1]["content"])
            if isinstance(given, list) and given and isinstance(given[-1], dict)
            else None
        )
        if turns is not None:
            options["constraint"] = lambda n: script(self.engine, turns[n]) if n < len(turns) else None
        return self.engine.add_request(prompt, params, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(server, engine): tools lookup and slow, plus the test MCP server's tools."""
    yield from live_server(tmp_path_factory)


def live_server(
    tmp_path_factory, max_tool_rounds: int = 4, tools: tuple[str, ...] = TOOLS, **server_options: Any
):
    """Yields (server, engine) as `live` does, with `tools` as its server tools, the server
    configured by `server_options`."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")
    extra = mcp_tools(MCP_COMMAND)
    config = ToolConfig(
        tools=tools, constrained=False, num_workers=2, call_timeout_s=120, max_tool_rounds=max_tool_rounds
    )
    engine = _engine_with(model_dir, config, extra)
    specs = {t.name: t.spec() for t in ToolRegistry([*tools, *extra])}
    server_config = ServerConfig(api_key=API_KEY, served_model_name="tiny", **server_options)
    app = build_app(
        engine.config, server_config, lambda: (EngineClient(ScriptedEngine(engine)), specs, "hermes")
    )
    with ServerThread(app) as server:
        yield server, engine


def _engine_with(model_dir: Path, tools: ToolConfig, extra: list) -> Any:
    from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from conveyor.engine.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),
        cache=CacheConfig(num_blocks=256, block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128),
        tools=tools,
    )
    return LLMEngine(config, progress=False, tools=extra)
