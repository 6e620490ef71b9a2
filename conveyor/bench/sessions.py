"""How much of a client-tool follow-up's repeated prefix the server serves from its cache.

One round trip per question through the official `openai` client against `conveyor serve` in
this process (loopback): a turn that must call `get_weather` (named tool_choice), then the
follow-up that repeats the conversation with the returned message and a tool result. The
repeated prefix is the first turn's prompt and completion tokens (its end-of-turn token
included); the share is the follow-up's `cached_tokens` over it. Both settings run in the same
invocation, one server after the other: "today" (`--no-exact-continuation`, `--no-session-kv`:
the prefix cache alone, the assistant message re-rendered) and "sessions" (both on).
Usage: `python -m conveyor.bench.sessions [--model default] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from conveyor.bench.results import write_json
from conveyor.config import EngineConfig, ModelConfig, SchedulerConfig, ServerConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
QUESTIONS = ("What is the weather in Paris?", "Is it raining in Oslo right now?", "How warm is it in Lima?")
SETTINGS = {"today": False, "sessions": True}


def run_sessions_bench(model: str = "default", max_tokens: int = 96) -> dict[str, Any]:
    rows = []
    for name, on in SETTINGS.items():
        engine = EngineConfig(
            model=ModelConfig(model=model), scheduler=SchedulerConfig(session_kv=on, session_max_ttl_s=300)
        )
        server = ServerConfig(port=0, served_model_name="m", exact_continuation=on)
        rows += [{"setting": name, **row} for row in _rounds(engine, server, max_tokens)]
    return {
        "model": model,
        "rows": rows,
        "share": {name: _share([r for r in rows if r["setting"] == name]) for name in SETTINGS},
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _rounds(engine: EngineConfig, server: ServerConfig, max_tokens: int) -> list[dict[str, Any]]:
    import openai

    from conveyor.server.serve import ServerThread, build_app, engine_loader

    app = build_app(engine, server, engine_loader(engine, server))
    live = ServerThread(app).start(timeout_s=900)  # loading the model on a busy machine
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0, timeout=900)
        return [_one(client, question, max_tokens) for question in QUESTIONS]
    finally:
        live.stop()


def _one(client: Any, question: str, max_tokens: int) -> dict[str, Any]:
    messages: list[Any] = [{"role": "user", "content": question}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model="m", messages=messages, tools=[WEATHER], tool_choice=named, temperature=0, max_tokens=max_tokens
    )
    message = first.choices[0].message
    calls = message.tool_calls or []
    messages += [message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": '{"temperature_c": 21}'} for c in calls]
    started = time.perf_counter()
    follow = client.chat.completions.create(
        model="m", messages=messages, tools=[WEATHER], temperature=0, max_tokens=8
    )
    return {
        "question": question,
        "finish_reason": first.choices[0].finish_reason,
        "repeated_tokens": first.usage.prompt_tokens + first.usage.completion_tokens,
        "follow_up_prompt_tokens": follow.usage.prompt_tokens,
        "cached_tokens": follow.usage.prompt_tokens_details.cached_tokens,
        "follow_up_s": time.perf_counter() - started,
    }


def _share(rows: list[dict[str, Any]]) -> float:
    repeated = sum(r["repeated_tokens"] for r in rows)
    return sum(min(r["cached_tokens"], r["repeated_tokens"]) for r in rows) / repeated if repeated else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run_sessions_bench(args.model)
    for row in result["rows"]:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    print("share of the repeated prefix served from cache:", result["share"], "load:", result["loadavg"])
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
