"""RemoteEngine against our own scripted streamer on loopback: tool rounds, continuation
prompts, partial-vs-lazy equivalence, early close on rejection and abort, and fault cases."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest

from conveyor.backends import BackendError, open_engine
from conveyor.backends.remote import RemoteEngine
from conveyor.config import BackendConfig, EngineConfig, ModelConfig, ToolConfig
from conveyor.tools.grammar import structural_tag
from tests.backends.fake_server import FakeEngine, Reply, chunks_of
from tests.engine.helpers import drain, results_of, text_of
from tests.engine.test_tools import CALL, QUESTION, TOOLS
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def fake():
    server = FakeEngine()
    yield server
    server.close()


def config(model_dir, url: str, tools: tuple[str, ...] = TOOLS[:3], **backend) -> EngineConfig:
    """The test tools without python; tool workers take seconds to start on a busy box, so
    engines of single tests serve none."""
    tools = ToolConfig(tools=tools, constrained=False, num_workers=2, call_timeout_s=10)
    backend = {"max_retries": 2, "retry_backoff_s": 0.01, "read_timeout_s": 5.0, **backend}
    return EngineConfig(
        model=ModelConfig(model=str(model_dir)), tools=tools, backend=BackendConfig(backend=url, **backend)
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")


@pytest.fixture(scope="module")
def engine(model_dir, fake):
    with open_engine(config(model_dir, fake.url), progress=False) as engine:
        yield engine


def run(engine, **options):
    return drain(engine, engine.add_request(QUESTION, {"max_tokens": 100}, **options))


def test_open_engine_picks_the_remote_backend(engine) -> None:
    assert isinstance(engine, RemoteEngine)
    assert engine.model_name == "fake-model"


def test_plain_streaming_sends_the_rendered_prompt(engine, fake) -> None:
    fake.reset(
        Reply(
            chunks_of("Hello there."),
            usage={
                "prompt_tokens": 12,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        )
    )
    outputs = run(engine)
    assert text_of(outputs) == "Hello there."
    last = outputs[-1]
    assert (last.finished, last.finish_reason, last.num_output_tokens, last.num_cached_tokens) == (
        True,
        "stop",
        4,
        8,
    )
    body = fake.bodies[0]
    assert (
        body["prompt"] == engine.encode(QUESTION) and body["stream"] is True and body["model"] == "fake-model"
    )
    assert body["max_tokens"] == 100 and "json_schema" not in body


def test_penalties_and_bias_are_sent_and_logprobs_refused(engine, fake) -> None:
    fake.reset(Reply(chunks_of("Hi.")))
    params = {"max_tokens": 5, "frequency_penalty": 0.5, "presence_penalty": -1.0, "logit_bias": {7: 3.0}}
    drain(engine, engine.add_request(QUESTION, params))
    body = fake.bodies[0]
    assert (body["frequency_penalty"], body["presence_penalty"], body["logit_bias"]) == (
        0.5,
        -1.0,
        {"7": 3.0},
    )
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request(QUESTION, {"max_tokens": 5, "logprobs": 2})
    assert not engine.has_unfinished


@pytest.mark.parametrize("mode", ["partial", "lazy"])
def test_a_call_runs_and_the_next_turn_extends_the_prompt_verbatim(engine, fake, mode) -> None:
    raw = "Let me look.\n" + CALL
    fake.reset(Reply(chunks_of(raw)), Reply(chunks_of("It is value-of-k1.")))
    outputs = run(engine, tools=["lookup"], tool_mode=mode)
    assert text_of(outputs) == raw + "It is value-of-k1."
    assert results_of(outputs) == ["value-of-k1value-of-k1"]
    assert outputs[-1].finish_reason == "stop"
    first, second = (b["prompt"] for b in fake.bodies)
    assert second == first + raw + engine.driver.renderer.render(["value-of-k1value-of-k1"], None)


def test_partial_and_lazy_give_the_same_conversation(engine, fake) -> None:
    runs = {}
    for mode in ("partial", "lazy"):
        fake.reset(Reply(chunks_of(CALL, 2)), Reply(chunks_of("Done.")))
        outputs = run(engine, tools=["lookup"], tool_mode=mode)
        runs[mode] = (text_of(outputs), results_of(outputs), [b["prompt"] for b in fake.bodies])
    assert runs["partial"] == runs["lazy"]


def test_a_rejected_field_closes_the_remote_stream_at_once(engine, fake) -> None:
    bad = '<tool_call>\n{"name": "form", "arguments": {"email": "nope", "age": 3'
    chunks = chunks_of(bad) + tuple(" 1" for _ in range(300))  # 9 s of slow tokens after the bad field
    fake.reset(Reply(chunks, delay_s=0.03), Reply(chunks_of("Sorry.")))
    outputs = run(engine, tools=["form"])
    assert fake.disconnected.wait(5.0)  # the streamer saw the client go mid-stream
    assert fake.num_sent < len(chunks)
    assert "not an email address" in results_of(outputs)[0]
    assert text_of(outputs).endswith("Sorry.") and outputs[-1].finish_reason == "stop"
    assert fake.bodies[1]["prompt"].startswith(fake.bodies[0]["prompt"] + '<tool_call>\n{"name": "form"')


def test_abort_closes_the_remote_stream(engine, fake) -> None:
    fake.reset(Reply(tuple("x" for _ in range(500)), delay_s=0.02))
    rid = engine.add_request(QUESTION, {"max_tokens": 600})
    while engine.has_unfinished and not any(out.new_text for out in engine.step()):
        pass
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert fake.disconnected.wait(5.0) and fake.num_sent < 400
    assert not engine.has_unfinished


def test_an_error_status_is_a_clear_error_and_no_tool_runs(engine, fake) -> None:
    fake.reset(Reply(status=400, error="max_tokens is too large"))
    outputs = run(engine, tools=["lookup"])
    assert outputs[-1].finish_reason == "error" and "400" in outputs[-1].error
    assert "max_tokens is too large" in outputs[-1].error
    assert results_of(outputs) == [] and len(fake.bodies) == 1  # a 400 is not retried
    assert not engine.driver.sessions


def test_overload_before_the_first_token_is_retried(engine, fake) -> None:
    fake.reset(Reply(status=503, error="busy"), Reply(status=503, error="busy"), Reply(chunks_of("fine")))
    outputs = run(engine)
    assert text_of(outputs) == "fine" and outputs[-1].finish_reason == "stop"
    assert len(fake.bodies) == 3


def test_a_dropped_stream_is_not_retried_and_runs_no_external_tool(engine, fake) -> None:
    call = '<tool_call>\n{"name": "send_mail", "arguments": {"to": "a@b.c"}}\n</tool_call>'
    fake.reset(Reply(chunks_of(call) + ("more",) * 5, drop_after=len(chunks_of(call)) + 2))
    outputs = run(engine, tools=["send_mail"])
    assert outputs[-1].finish_reason == "error" and "dropped" in outputs[-1].error
    assert results_of(outputs) == [] and len(fake.bodies) == 1
    assert text_of(outputs).startswith(call)


def test_slow_tokens_past_the_read_timeout_end_in_an_error(model_dir, fake) -> None:
    fake.reset(Reply(("a", "b"), delay_s=1.0))
    with RemoteEngine(
        config(model_dir, fake.url, (), read_timeout_s=0.2, max_retries=0), progress=False
    ) as engine:
        outputs = run(engine)
    assert outputs[-1].finish_reason == "error" and "timed out" in outputs[-1].error


def test_an_unreachable_engine_is_a_clear_error_at_start(model_dir, fake) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(BackendError, match="unreachable"):
        RemoteEngine(config(model_dir, url, ()), progress=False)


def test_a_remote_engine_gone_mid_service_fails_its_requests(model_dir) -> None:
    gone = FakeEngine()
    engine = RemoteEngine(config(model_dir, gone.url, (), max_retries=1), progress=False)
    gone.close()
    with engine:
        outputs = run(engine)
    assert outputs[-1].finish_reason == "error" and "unreachable" in outputs[-1].error


def test_bad_requests_raise_before_anything_is_sent(engine, fake) -> None:
    fake.reset()
    with pytest.raises(ValueError, match="unknown tools"):
        engine.add_request(QUESTION, tools=["nope"])
    with pytest.raises(ValueError, match="not among"):
        engine.add_request(
            QUESTION, tools=["lookup"], tool_choice={"type": "function", "function": {"name": "x"}}
        )
    assert fake.bodies == [] and not engine.has_unfinished and not engine.driver.sessions


def test_a_named_tool_choice_becomes_a_json_schema_and_later_turns_a_lazy_grammar(model_dir, fake) -> None:
    args = '{"name": "lookup", "arguments": {"key": "k1"}}'
    fake.reset(Reply(chunks_of(args)), Reply(chunks_of("ok")))
    tools = ToolConfig(tools=TOOLS[:3], constrained=True, num_workers=1, call_timeout_s=10)
    with RemoteEngine(
        dataclasses.replace(config(model_dir, fake.url), tools=tools), progress=False
    ) as engine:
        outputs = run(
            engine, tools=["lookup"], tool_choice={"type": "function", "function": {"name": "lookup"}}
        )
    first, second = fake.bodies
    assert first["prompt"].endswith("<tool_call>\n")
    assert first["json_schema"]["anyOf"][0]["properties"]["name"] == {"const": "lookup"}
    # the call is closed as the model writes it, so the continuation reads as a whole call
    assert text_of(outputs) == "<tool_call>\n" + args + "\n</tool_call>" + "ok"
    assert (
        args + "\n</tool_call><|im_end|>\n" in second["prompt"] and second["prompt"].count("<tool_call>") == 1
    )
    assert second["grammar_lazy"] is True and second["grammar_triggers"][0]["value"] == "<tool_call>"
    assert results_of(outputs) == ["value-of-k1"]


def test_the_vllm_dialect_sends_the_embedded_engines_structural_tag(model_dir, fake) -> None:
    fake.reset(Reply(chunks_of("Nothing to look up.")))
    tools = ToolConfig(tools=TOOLS[:3], constrained=True, num_workers=1, call_timeout_s=10)
    cfg = dataclasses.replace(config(model_dir, fake.url, backend_dialect="vllm"), tools=tools)
    with RemoteEngine(cfg, progress=False) as engine:
        run(engine, tools=["lookup"])
        spec = engine.driver.executor.registry.get("lookup").spec()
    sent = json.loads(fake.bodies[0]["structured_outputs"]["structural_tag"])
    assert sent == json.loads(structural_tag([spec], "auto").model_dump_json())


def test_a_json_schema_for_the_reply_is_refused_not_ignored(engine) -> None:
    """Structured output is not sent to remote engines yet: a ValueError (the server's 400)
    before anything is sent, never an unconstrained reply."""
    with pytest.raises(ValueError, match="response_format"):
        engine.add_request(QUESTION, {"max_tokens": 10}, json_schema={"type": "object"})
    assert not engine.has_unfinished
