"""The soak's clients: a bounded number of threads, each sending one request at a time from a
mix of plain chats, client-tool calls (with follow-up turns), server-tool calls (calculator,
python, the fault tool) and invalid requests, with random `max_tokens` and random aborts
(a stream closed after a random number of events, a non-streamed request given up on).

Every request ends as one outcome: `ok` (a whole answer), `aborted` (the client left on
purpose), `rejected` (an invalid request answered 4xx, as it should be), `unexpected_4xx`,
`5xx`, or `error` (a transport failure, a stream that ended without its finish reason, or an
error event mid-stream), with its first few details kept for the report.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

# kind -> weight in the mix
MIX = {
    "chat": 20,
    "chat_nostream": 8,
    "nostream_disconnect": 4,
    "client_tool": 20,
    "server_tool": 40,
    "bad": 8,
}
SERVER_TOOLS = ("calculator", "python", "fault")
CHAT_PROMPTS = (
    "Write a haiku about queues.",
    "Explain a hash map in two sentences.",
    "List three uses of a stack.",
    "What does HTTP status 429 mean?",
)
TOOL_PROMPTS = {
    "calculator": "What is 17 * 23 + 4? Use the calculator.",
    "python": "Write Python code that prints the first ten square numbers.",
    "fault": "Look up the key 'alpha' in the flaky store.",
}
FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"enum": [1, 2, 3]}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
MAX_DETAILS = 20


@dataclass(frozen=True, slots=True)
class LoadConfig:
    url: str
    model: str
    concurrency: int
    max_requests: int  # 0: no limit but time
    abort_share: float  # share of streamed requests closed early
    max_tokens: tuple[int, int]  # uniform range of each request's max_tokens
    seed: int
    request_timeout_s: float
    long_prompt_words: int  # a prompt past the model's context (an invalid request)
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))  # request kind -> weight


@dataclass(slots=True)
class Outcome:
    kind: str
    outcome: str
    finish_reason: str | None = None
    tool_results: list[tuple[str, str]] = field(default_factory=list)  # server tools' (name, result)
    client_calls: list[tuple[str, str]] = field(default_factory=list)  # client tools' (call id, arguments)
    detail: str = ""


def parse_mix(text: str) -> dict[str, int]:
    """`kind=weight,...` (e.g. "chat=1,server_tool=3") -> the mix; "" -> the default MIX."""
    if not text:
        return dict(MIX)
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        if kind.strip() not in MIX or not weight.strip().isdigit():
            raise ValueError(f"--mix wants kind=weight items with kinds from {', '.join(MIX)}, got {item!r}")
        mix[kind.strip()] = int(weight)
    if not any(mix.values()):
        raise ValueError("--mix needs a positive weight")
    return mix


class Outcomes:
    """Counts of all requests' outcomes, shared by the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {}
        self.finish_reasons: Counter[str] = Counter()
        self.tool_results: Counter[str] = Counter()
        self.details: list[str] = []

    def add(self, o: Outcome) -> None:
        with self._lock:
            self.outcomes[o.outcome] += 1
            self.by_kind.setdefault(o.kind, Counter())[o.outcome] += 1
            if o.finish_reason:
                self.finish_reasons[o.finish_reason] += 1
            for name, text in o.tool_results:
                self.tool_results[classify_result(name, text)] += 1
            if o.outcome in ("unexpected_4xx", "5xx", "error") and len(self.details) < MAX_DETAILS:
                self.details.append(f"{o.kind}: {o.outcome}: {o.detail[:300]}")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self.outcomes.values()),
                **{k: self.outcomes[k] for k in sorted(self.outcomes)},
            }

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "outcomes": dict(self.outcomes),
                "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
                "finish_reasons": dict(self.finish_reasons),
                "tool_results": dict(sorted(self.tool_results.items())),
                "details": list(self.details),
            }


_INJECTED = re.compile(r"(?:\w+: )?fault:(\w+)")


def classify_result(tool: str, text: str) -> str:
    """`tool:kind`: the fault tool's injected kind, a pool-made error (timeout, dead worker),
    an error result, or ok."""
    if injected := _INJECTED.match(text):  # a result, or an exception the tool raised
        return f"{tool}:{injected.group(1)}"
    if "did not finish within" in text:
        return f"{tool}:timeout"
    if "worker process died" in text:
        return f"{tool}:worker-died"
    return f"{tool}:error" if "Error" in text[:200] else f"{tool}:ok"


class Load:
    """`concurrency` client threads until `stop()` or `max_requests` sent."""

    def __init__(self, config: LoadConfig, outcomes: Outcomes) -> None:
        self.config = config
        self.outcomes = outcomes
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.num_sent = 0
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"soak-client-{i}", daemon=True)
            for i in range(config.concurrency)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> bool:
        """Let each client finish its request in flight; False if one is still running after timeout_s."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
        return not any(t.is_alive() for t in self._threads)

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (
                self.config.max_requests and self.num_sent >= self.config.max_requests
            ):
                return False
            self.num_sent += 1
            return True

    def _client(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        kinds, weights = list(self.config.mix), list(self.config.mix.values())
        with httpx.Client(base_url=self.config.url, timeout=self.config.request_timeout_s) as http:
            while self._take():
                kind = rng.choices(kinds, weights)[0]
                for outcome in _REQUESTS[kind](http, self.config, rng):
                    self.outcomes.add(outcome)


# ---- one request of each kind (each yields the outcomes of the HTTP requests it made) ---------
def _body(config: LoadConfig, rng: random.Random, messages: list[dict], **extra: Any) -> dict[str, Any]:
    return {
        "model": config.model,
        "messages": messages,
        "max_tokens": rng.randint(*config.max_tokens),
        "temperature": rng.choice((0.0, 0.7, 1.0)),
        "seed": rng.randint(0, 2**31),
        **extra,
    }


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _abort_after(config: LoadConfig, rng: random.Random) -> int | None:
    """The number of stream events after which the client closes the stream, or None."""
    return rng.randint(0, 40) if rng.random() < config.abort_share else None


def _chat(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    body = _body(config, rng, _user(rng.choice(CHAT_PROMPTS)))
    return [stream_request(http, "chat", body, _abort_after(config, rng))]


def _chat_nostream(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    body = _body(config, rng, _user(rng.choice(CHAT_PROMPTS)))
    return [plain_request(http, "chat_nostream", body)]


def _nostream_disconnect(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    """A non-streamed request whose client gives up (a short read timeout) before the answer."""
    body = _body(config, rng, _user(rng.choice(CHAT_PROMPTS)))
    return [plain_request(http, "nostream_disconnect", body, timeout_s=rng.uniform(0.05, 1.5))]


def _client_tool(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    """A named client tool (the grammar forces the call); half the time the client answers it."""
    messages = _user("What is the weather in Paris for the next two days?")
    body = _body(
        config,
        rng,
        messages,
        tools=[FORECAST],
        tool_choice={"type": "function", "function": {"name": "forecast"}},
    )
    first = plain_request(http, "client_tool", body)
    calls = first.client_calls
    if first.outcome != "ok" or first.finish_reason != "tool_calls" or not calls or rng.random() < 0.5:
        return [first]
    call_id, arguments = calls[0]
    follow = [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "forecast", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"city": "Paris", "high_c": 21})},
    ]
    return [
        first,
        stream_request(
            http,
            "client_tool_followup",
            _body(config, rng, follow, tools=[FORECAST]),
            _abort_after(config, rng),
        ),
    ]


def _server_tool(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    name = rng.choice(SERVER_TOOLS)
    body = _body(
        config, rng, _user(TOOL_PROMPTS[name]), tool_choice={"type": "function", "function": {"name": name}}
    )
    return [stream_request(http, f"server_tool:{name}", body, _abort_after(config, rng))]


def _bad(http: httpx.Client, config: LoadConfig, rng: random.Random) -> list[Outcome]:
    """An invalid request, which must be refused with a 4xx and leave nothing behind."""
    messages = _user("hello")
    bodies = [
        _body(config, rng, messages, tool_choice={"type": "function", "function": {"name": "no_such_tool"}}),
        {**_body(config, rng, messages), "model": "no-such-model"},
        {**_body(config, rng, messages), "temperature": 5},
        _body(config, rng, []),
        _body(config, rng, messages, tool_choice="required"),
        _body(config, rng, _user("word " * config.long_prompt_words), stream=True),
    ]
    return [plain_request(http, "bad", rng.choice(bodies), expect_4xx=True)]


_REQUESTS = {
    "chat": _chat,
    "chat_nostream": _chat_nostream,
    "nostream_disconnect": _nostream_disconnect,
    "client_tool": _client_tool,
    "server_tool": _server_tool,
    "bad": _bad,
}


# ---- HTTP ---------------------------------------------------------------------------------
def _status_outcome(kind: str, response: httpx.Response, expect_4xx: bool) -> Outcome | None:
    code = response.status_code
    if code < 400:
        return Outcome(kind, "error", detail=f"HTTP {code} to an invalid request") if expect_4xx else None
    text = response.read().decode(errors="replace")
    if code >= 500:
        return Outcome(kind, "5xx", detail=f"HTTP {code}: {text}")
    return Outcome(kind, "rejected" if expect_4xx else "unexpected_4xx", detail=f"HTTP {code}: {text}")


def plain_request(
    http: httpx.Client,
    kind: str,
    body: dict[str, Any],
    timeout_s: float | None = None,
    expect_4xx: bool = False,
) -> Outcome:
    """A non-streamed request; `timeout_s` set: a client that gives up reading is `aborted`."""
    try:
        with http.stream(
            "POST", "/v1/chat/completions", json=body, timeout=timeout_s or http.timeout
        ) as response:
            if (bad := _status_outcome(kind, response, expect_4xx)) is not None:
                return bad
            data = json.loads(response.read())
    except httpx.TimeoutException as e:
        return Outcome(kind, "aborted" if timeout_s else "error", detail=repr(e))
    except (httpx.HTTPError, ValueError) as e:
        return Outcome(kind, "error", detail=repr(e))
    choice = data["choices"][0]
    message = choice["message"]
    calls = [(c["id"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    results = [
        (c["function"]["name"], str(c.get("result", ""))) for c in message.get("server_tool_calls") or []
    ]
    return Outcome(kind, "ok", choice["finish_reason"], results, calls)


def stream_request(http: httpx.Client, kind: str, body: dict[str, Any], abort_after: int | None) -> Outcome:
    """A streamed request, closed by the client after `abort_after` events when that is set."""
    body = {**body, "stream": True}
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if (bad := _status_outcome(kind, response, False)) is not None:
                return bad
            return _read_events(kind, response.iter_lines(), abort_after)
    except (httpx.HTTPError, ValueError) as e:
        return Outcome(kind, "error", detail=repr(e))


def _read_events(kind: str, lines: Any, abort_after: int | None) -> Outcome:
    out, names, num_events = Outcome(kind, "error", detail="the stream ended without [DONE]"), {}, 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            if out.finish_reason is None:
                out.detail = "[DONE] without a finish reason"
                return out
            out.outcome, out.detail = "ok", ""
            return out
        if abort_after is not None and num_events >= abort_after:
            out.outcome, out.detail = "aborted", ""
            return out  # leaving the `with` closes the connection: the server aborts
        num_events += 1
        event = json.loads(line[6:])
        if "error" in event:
            out.detail = f"error event: {json.dumps(event)[:300]}"
            return out
        _note_event(out, event, names)
    return out


def _note_event(out: Outcome, event: dict[str, Any], names: dict[str, str]) -> None:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        for call in [*(delta.get("tool_calls") or []), *(delta.get("server_tool_calls") or [])]:
            if call.get("id"):
                names[call["id"]] = call["function"]["name"]
        for result in delta.get("server_tool_results") or []:
            out.tool_results.append(
                (names.get(result.get("tool_call_id"), "?"), str(result.get("content", "")))
            )
        if choice.get("finish_reason"):
            out.finish_reason = choice["finish_reason"]
