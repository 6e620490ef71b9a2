"""An engine no request can kill: faults injected into a stand-in engine behind the real server.

Exceptions of any type raised while admitting a request fail that request alone; a step
that raises fails the requests it ran; an engine thread that dies answers every waiting
request at once, turns /health to 503, refuses new requests and makes `serve` exit non-zero.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from conveyor.config import ServerConfig
from conveyor.engine.engine import RequestOutput
from conveyor.server.client import EngineClient
from conveyor.server.serve import ServerThread, build_app

TIMEOUT_S = 30


class Injected(BaseException):
    """Not an Exception: nothing on the engine thread catches it, so the thread dies."""


class FaultyEngine:
    """Answers each request with one token, unless its prompt names a fault to inject."""

    max_model_len = 64

    def __init__(self) -> None:
        self.doomed = False
        self.queued: list[str] = []
        self.step_fails = False

    @property
    def has_unfinished(self) -> bool:
        if self.doomed:
            raise Injected("the engine thread was killed")
        return bool(self.queued)

    def add_request(self, prompt, params=None, *, request_id: str, **options) -> str:
        text = prompt[-1]["content"]
        faults = {
            "type-error": TypeError("unhashable type: 'dict'"),
            "recursion": RecursionError("maximum recursion depth exceeded"),
            "zero": ZeroDivisionError("division by zero"),
        }
        if text in faults:
            raise faults[text]
        self.doomed = text == "die"
        self.step_fails = text == "bad-step"
        self.queued.append(request_id)
        return request_id

    def step(self) -> list[RequestOutput]:
        if self.step_fails:
            self.step_fails = False
            raise RuntimeError("injected step fault")
        done, self.queued = self.queued, []
        return [RequestOutput(r, [1], "x", True, "length", 1, 1) for r in done]

    def abort(self, request_id: str) -> None:
        if request_id in self.queued:
            self.queued.remove(request_id)

    def close(self) -> None:
        pass


def _config():
    from conveyor.config import EngineConfig, ModelConfig

    return EngineConfig(model=ModelConfig(model="unused"))


@pytest.fixture
def faulty():
    fatal = threading.Event()
    engine = FaultyEngine()
    app = build_app(
        _config(),
        ServerConfig(served_model_name="m"),
        lambda: (EngineClient(engine), {}, "hermes"),
        on_fatal=fatal.set,
    )
    server = ServerThread(app).start()
    try:
        yield server, fatal
    finally:
        server.stop()
        assert not server._thread.is_alive(), "the server did not stop"


def send(server, text: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("fault", "status"), [("type-error", 400), ("recursion", 400), ("zero", 500), ("bad-step", 500)]
)
def test_a_fault_fails_its_request_alone(faulty, fault, status):
    server, fatal = faulty
    r = send(server, fault)
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert send(server, "hello").status_code == 200
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert not fatal.is_set()


def test_engine_thread_death_fails_health_and_refuses_requests(faulty):
    server, fatal = faulty
    r = send(server, "die")  # in flight when the thread dies: answered, not hung
    assert r.status_code == 500 and "killed" in r.json()["error"]["message"]
    assert fatal.wait(TIMEOUT_S)
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and "killed" in health.json()["error"]
    later = send(server, "hello")
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_failed"


def test_serve_exits_non_zero_when_the_engine_thread_dies(monkeypatch):
    from conveyor.server import serve as serve_module

    engine = FaultyEngine()
    engine.doomed = True  # dies on its first look at the queue
    monkeypatch.setattr(
        serve_module,
        "engine_loader",
        lambda config, server, **_: lambda: (EngineClient(engine), {}, "hermes"),
    )
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            serve_module.serve(_config(), ServerConfig(port=0, served_model_name="m"))
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "serve did not stop after the engine thread died"
    assert len(outcome) == 1 and isinstance(outcome[0], SystemExit)
    assert "engine failed" in str(outcome[0].code)


class SlowPreparing(FaultyEngine):
    """Preparation (template, tokens, grammar) hangs for prompts that say so, as a grammar
    compile of a pathological schema would."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def prepare(self, prompt, **options):
        if prompt[-1]["content"] == "hang":
            self.release.wait(TIMEOUT_S)
        return prompt


def test_preparation_is_time_bounded_and_off_the_engine_thread():
    engine = SlowPreparing()
    app = build_app(
        _config(),
        ServerConfig(served_model_name="m"),
        lambda: (EngineClient(engine, prepare_timeout_s=0.5), {}, "hermes"),
    )
    with ServerThread(app) as server:
        try:
            r = send(server, "hang")
            assert r.status_code == 400 and "longer than 0.5 s" in r.json()["error"]["message"]
            assert send(server, "hello").status_code == 200  # neither the engine nor the pool is stuck
        finally:
            engine.release.set()


def test_a_stream_whose_engine_dies_ends_with_an_error_event(faulty):
    server, fatal = faulty
    body = {"model": "m", "messages": [{"role": "user", "content": "die"}], "max_tokens": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "killed" in lines[-1] and '"server_error"' in lines[-1]
    assert fatal.wait(TIMEOUT_S)
