"""RemoteEngine against a real llama.cpp server (xllamacpp) serving SmolLM2-135M on loopback:
streaming, a constrained tool round whose continuation hits the server's prefix cache,
partial-vs-lazy equivalence, and abort stopping the server's decoding."""

from __future__ import annotations

import time

import httpx
import pytest

from conveyor.backends.remote import RemoteEngine
from conveyor.config import BackendConfig, EngineConfig, ModelConfig, ToolConfig
from tests.engine.test_tools import QUESTION

pytest.importorskip("xllamacpp")

NAMED = {"type": "function", "function": {"name": "lookup"}}


@pytest.fixture(scope="module")
def server():
    from tests.backends.llamacpp import llama_server

    with llama_server() as url:
        yield url


@pytest.fixture(scope="module")
def engine(server):
    tools = ToolConfig(tools=("tests.engine.test_tools:lookup",), num_workers=1, call_timeout_s=20)
    config = EngineConfig(
        model=ModelConfig(model="smollm2-135m"),
        tools=tools,
        backend=BackendConfig(backend=server, read_timeout_s=60),
    )
    with RemoteEngine(config, progress=False) as engine:
        yield engine


def run(engine, **options):
    rid = engine.add_request(QUESTION, {"max_tokens": 48}, **options)
    outputs = []
    while engine.has_unfinished:
        outputs += [out for out in engine.step() if out.request_id == rid]
    return outputs


def test_a_plain_request_streams_text(engine) -> None:
    outputs = run(engine)
    assert "".join(o.new_text for o in outputs).strip()
    assert len(outputs) > 2  # streamed, not one blob
    last = outputs[-1]
    assert last.finished and last.finish_reason in ("stop", "length") and last.num_output_tokens > 0


def test_a_named_call_runs_and_the_continuation_reuses_the_prefix_cache(engine) -> None:
    rid = engine.add_request(QUESTION, {"max_tokens": 48}, tools=["lookup"], tool_choice=NAMED)
    request = engine._requests[rid]
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert [r.name for o in outputs for r in o.tool_results] == ["lookup"]
    first, second = request.turn_usage[:2]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    # the whole first prompt and (almost) all of the model's own output came from the cache
    assert cached >= first["prompt_tokens"] + first["completion_tokens"] - 2
    assert second["prompt_tokens"] - cached < 40  # only the tool-result turn is prefilled


def test_partial_and_lazy_give_the_same_conversation(engine) -> None:
    runs = {}
    for mode in ("partial", "lazy"):
        outputs = run(engine, tools=["lookup"], tool_choice=NAMED, tool_mode=mode)
        runs[mode] = (
            "".join(o.new_text for o in outputs),
            [r.content for o in outputs for r in o.tool_results],
        )
    assert runs["partial"] == runs["lazy"] and runs["partial"][1]


def test_abort_stops_the_server_decoding(engine, server) -> None:
    rid = engine.add_request(QUESTION, {"max_tokens": 2000, "ignore_eos": True})
    while engine.has_unfinished and not any(out.new_text for out in engine.step()):
        pass
    assert engine.abort(rid) is not None  # still decoding when aborted
    deadline = time.monotonic() + 10
    while _processing(server) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the server's gauge
    assert _processing(server) == 0


def _processing(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    return int(
        float(
            next(
                line.split()[1]
                for line in metrics.splitlines()
                if line.startswith("llamacpp:requests_processing")
            )
        )
    )


def test_an_auto_turn_is_free_text_until_a_call_starts_then_follows_the_lazy_grammar(engine) -> None:
    from conveyor.backends.constraints import remote_form

    spec = engine.driver.executor.registry.get("lookup").spec()
    form = remote_form("llama.cpp", [spec], "auto")
    calls = '<tool_call>\n{"name": "lookup", "arguments": {"key": "k%d"}}\n</tool_call>\n'
    prompt = "Calls, one per line:\n" + "".join(calls % n for n in range(4))
    request = engine._requests[engine.add_request(prompt, {"max_tokens": 60}, constraint=form.fields)]
    while engine.has_unfinished:
        engine.step()
    # the model starts another call: from `<tool_call>` on it is held to one call of a served tool,
    # which ends the turn (a stop, not the length limit)
    assert request.finish_reason == "stop", request.text
    _, _, call = request.text.partition("<tool_call>")
    assert call.endswith("}\n</tool_call>") and call.strip().startswith('{"name": "lookup", "arguments": {')
