"""The agents benchmark's client loop: the official `openai` client (AsyncOpenAI, streamed) runs
each program as an agent would: send the conversation, read the answer's `tool_calls`, run the
tools (here: wait a sampled tool latency, then send the recorded results), send the whole
conversation again, until the program's last answer. Programs arrive as a Poisson process.

Per request it records the time to the first token (the first content or tool-call delta),
`usage.prompt_tokens` and the tokens served from cache, and what the follow-up repeats of the
conversation before it (the previous request's prompt and output tokens). Conveyor reports
cached tokens in `usage.prompt_tokens_details.cached_tokens`; llama.cpp's server in the last
chunk's `timings` (`cache_n` of `prompt_n + cache_n`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import openai

from conveyor.bench.agents_programs import AgentProgram, ModelTurn


@dataclass(frozen=True, slots=True)
class Target:
    """A server under test: Conveyor (`tools` given, calls answered as `tool_calls`) or
    llama.cpp's server (each turn forced by a GBNF grammar of its text; the tool list is in the
    system message, since its server takes no custom grammar beside `tools`)."""

    name: str
    url: str
    kind: str  # "conveyor" or "llamacpp"
    model: str = "bench"
    inline_tools: bool = (
        True  # llama.cpp: the tool list in the system message (as the template would show it)
    )


@dataclass(slots=True)
class TurnRecord:
    program_id: str
    index: int  # the request's place in its program
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    repeated_tokens: int  # what this request repeats of the conversation before it (0: first)
    calls_match: bool  # the answer's calls are the scripted ones


@dataclass(slots=True)
class ProgramRecord:
    program_id: str
    kind: str
    arrival_s: float  # after the run's start
    end_s: float = math.nan
    error: str = ""
    turns: list[TurnRecord] = field(default_factory=list)

    @property
    def jct_s(self) -> float:
        return self.end_s - self.arrival_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "jct_s": self.jct_s}


@dataclass(frozen=True, slots=True)
class LoadSpec:
    rate: float  # programs per second
    tool_median_s: float = 1.0
    tool_sigma: float = 0.5  # of the lognormal's log
    timeout_s: float = 600.0  # a program still running this long after the last arrival is cut
    seed: int = 0


def arrivals(num: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds after the start)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def tool_delays(program: AgentProgram, spec: LoadSpec) -> list[float]:
    """The program's tool latencies, one per model turn with calls; the same on every system."""
    rng = random.Random(f"{spec.seed}:{program.program_id}")
    return [
        rng.lognormvariate(math.log(spec.tool_median_s), spec.tool_sigma) for _ in range(program.num_requests)
    ]


async def run_load(target: Target, programs: list[AgentProgram], spec: LoadSpec) -> dict[str, Any]:
    """Run every program against the target with Poisson arrivals; the records and the KV
    samples of /metrics (Conveyor) taken meanwhile."""
    client = openai.AsyncOpenAI(
        base_url=target.url + "/v1", api_key="none", max_retries=0, timeout=spec.timeout_s
    )
    start = time.perf_counter()
    records = [
        ProgramRecord(p.program_id, p.kind, t)
        for p, t in zip(programs, arrivals(len(programs), spec.rate, spec.seed))
    ]
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(_sample_metrics(target, start, samples))
    tasks = [
        asyncio.create_task(_program(client, target, p, r, spec, start)) for p, r in zip(programs, records)
    ]
    deadline = (records[-1].arrival_s if records else 0) + spec.timeout_s
    _done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - (time.perf_counter() - start)))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    await client.close()
    for r in records:
        if math.isnan(r.end_s) and not r.error:
            r.error = f"not finished {spec.timeout_s:.0f} s after the last arrival"
    return {
        "wall_s": time.perf_counter() - start,
        "programs": [r.as_dict() for r in records],
        "kv_samples": samples,
    }


async def _program(
    client: Any, target: Target, program: AgentProgram, record: ProgramRecord, spec: LoadSpec, start: float
) -> None:
    await asyncio.sleep(max(0.0, start + record.arrival_s - time.perf_counter()))
    delays = iter(tool_delays(program, spec))
    messages: list[dict[str, Any]] = [{"role": "system", "content": _system(target, program)}]
    previous = 0
    try:
        for episode in program.episodes:
            messages.append({"role": "user", "content": episode.user})
            for turn in episode.turns:
                answer, t = await _request(
                    client, target, program, messages, turn, len(record.turns), previous
                )
                record.turns.append(t)
                previous = t.prompt_tokens + t.completion_tokens
                messages.append(answer)
                if turn.calls:
                    await asyncio.sleep(next(delays))  # the client runs its tools
                    messages += _tool_messages(target, answer, turn)
        record.end_s = time.perf_counter() - start
    except (openai.APIError, httpx.HTTPError, ValueError) as e:
        record.error = f"{type(e).__name__}: {e}"[:300]


def _system(target: Target, program: AgentProgram) -> str:
    if target.kind == "conveyor" or not target.inline_tools:
        return program.system
    tools = "\n".join(json.dumps(t) for t in program.tools)
    return f"{program.system}\n\n# Tools\n\n<tools>\n{tools}\n</tools>"  # what Qwen's template writes


async def _request(
    client: Any,
    target: Target,
    program: AgentProgram,
    messages: list[dict],
    turn: ModelTurn,
    index: int,
    previous: int,
) -> tuple[dict[str, Any], TurnRecord]:
    body: dict[str, Any] = {
        "model": target.model,
        "messages": messages,
        "max_tokens": 1024,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.kind == "conveyor":
        body |= {"tools": list(program.tools), "extra_headers": {"X-Session-Id": program.program_id}}
    else:
        body["extra_body"] = {"grammar": gbnf_literal(turn.text), "cache_prompt": True}
    sent = time.perf_counter()
    first, text, calls, usage, timings = 0.0, [], {}, None, None
    async for chunk in await client.chat.completions.create(**body):
        usage = chunk.usage or usage
        timings = (chunk.model_extra or {}).get("timings") or timings
        for choice in chunk.choices:
            delta = choice.delta
            if (delta.content or delta.tool_calls) and not first:
                first = time.perf_counter()
            text.append(delta.content or "")
            for c in delta.tool_calls or []:
                call = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = c.id or call["id"]
                call["name"] += (c.function.name or "") if c.function else ""
                call["arguments"] += (c.function.arguments or "") if c.function else ""
    end = time.perf_counter()
    answer = _answer("".join(text), [calls[i] for i in sorted(calls)], target)
    prompt, cached, completion = _usage(usage, timings)
    record = TurnRecord(
        program.program_id,
        index,
        (first or end) - sent,
        end - sent,
        prompt,
        cached,
        completion,
        previous,
        _matches(answer, turn, target),
    )
    return answer, record


def _answer(text: str, calls: list[dict], target: Target) -> dict[str, Any]:
    """The assistant message as the client appends it: as returned."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ]
    if target.kind == "llamacpp":
        message["content"] = text
    return message


def _matches(answer: dict[str, Any], turn: ModelTurn, target: Target) -> bool:
    if target.kind == "llamacpp":
        return answer["content"] == turn.text
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
        for c in answer.get("tool_calls") or []
    ]
    return got == [(name, json.loads(args)) for name, args in turn.calls]


def _tool_messages(target: Target, answer: dict[str, Any], turn: ModelTurn) -> list[dict[str, Any]]:
    """The recorded results, one tool message per call (by the returned call ids)."""
    ids = [c["id"] for c in answer.get("tool_calls") or []]
    ids += [f"call_{i}" for i in range(len(ids), len(turn.results))]
    return [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, turn.results)]


def _usage(usage: Any, timings: dict | None) -> tuple[int, int, int]:
    """(prompt tokens, of them served from cache, completion tokens)."""
    if timings and "cache_n" in timings:
        prompt = int(timings.get("prompt_n", 0)) + int(timings["cache_n"])
        return prompt, int(timings["cache_n"]), int(timings.get("predicted_n", 0))
    if usage is None:
        return 0, 0, 0
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    return usage.prompt_tokens, cached, usage.completion_tokens


def gbnf_literal(text: str) -> str:
    """A GBNF grammar whose only sentence is `text`."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'root ::= "{escaped}"'


_GAUGE = re.compile(
    r"^(conveyor_kv_blocks_used|conveyor_\w*session\w*|conveyor_requests_awaiting_tools)(?:\{[^}]*\})? ([0-9.e+-]+)$",
    re.MULTILINE,
)


async def _sample_metrics(
    target: Target, start: float, samples: list[dict[str, float]], every_s: float = 0.5
) -> None:
    """Conveyor's KV gauges every `every_s` (blocks in use; blocks kept for sessions, where the
    server has such a gauge)."""
    if target.kind != "conveyor":
        return
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            try:
                text = (await http.get(target.url + "/metrics")).text
                samples.append(
                    {"t_s": time.perf_counter() - start, **{m[1]: float(m[2]) for m in _GAUGE.finditer(text)}}
                )
            except httpx.HTTPError:
                pass  # a busy server: the next sample
            await asyncio.sleep(every_s)
