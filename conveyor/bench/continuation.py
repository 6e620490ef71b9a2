"""What a continuation after tool results costs the remote engine's prefill.

Runs tool requests (a named call, constrained by the remote engine, then the answer) through
RemoteEngine and reads, per continuation, the remote engine's usage report: prompt tokens and
the share its prefix cache served. As the baseline in the same run, it renders the same
conversation the way `/v1/chat/completions` would (the chat template re-rendering the
assistant's call from its parsed arguments) and counts how many leading tokens that prompt
shares with the one sent: a prefix cache can serve at most those. The remote engine's own
counters (`/metrics`: llama.cpp `prompt_tokens_cached_total`, vLLM `prefix_cache_hits`) are
read before and after. Usage: `python -m conveyor.bench.continuation URL [--dialect vllm] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
from rich.progress import Progress

from conveyor.backends.remote import RemoteEngine
from conveyor.bench.results import write_json
from conveyor.config import BACKEND_DIALECTS, BackendConfig, EngineConfig, ModelConfig, ToolConfig

QUESTIONS = (
    "What is 1234 * 5678? Use the calculator.",
    "What is (17 + 25) * 3 - 8? Use the calculator.",
    "How much is 2 ** 20 / 16? Use the calculator.",
)
NAMED = {"type": "function", "function": {"name": "calculator"}}
_COUNTERS = re.compile(
    r"^(llamacpp:prompt_tokens(?:_cached)?_total|vllm:prefix_cache_(?:hits|queries)_total)"
    r"(?:\{[^}]*\})? ([0-9.e+]+)$",
    re.MULTILINE,
)


def run_continuation_bench(
    url: str, model: str = "default", max_tokens: int = 64, dialect: str = "llama.cpp"
) -> dict[str, Any]:
    config = EngineConfig(
        model=ModelConfig(model=model),
        tools=ToolConfig(tools=("calculator",), num_workers=1),
        backend=BackendConfig(backend=url, backend_dialect=dialect, read_timeout_s=300),
    )
    rows = []
    with RemoteEngine(config) as engine, Progress() as progress:
        before = _counters(url)
        task = progress.add_task("tool requests", total=len(QUESTIONS))
        for question in QUESTIONS:
            rows.append(_one(engine, question, max_tokens))
            progress.advance(task)
        after = _counters(url)
    return {
        "url": url,
        "model": model,
        "dialect": dialect,
        "remote_model": engine.model_name,
        "rows": rows,
        "remote_counters": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _one(engine: RemoteEngine, question: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}]
    rid = engine.add_request(messages, {"max_tokens": max_tokens}, tools=["calculator"], tool_choice=NAMED)
    request = engine._requests[rid]
    results, sent = [], None
    while engine.has_unfinished:
        results += [r for out in engine.step() for r in out.tool_results]
        if request.turn == 1 and sent is None:
            sent = request.prompt  # the continuation's prompt, as sent
    if len(request.turn_usage) < 2 or not results or sent is None:
        return {"question": question, "finish_reason": request.finish_reason, "continuation": None}
    first, second = request.turn_usage[:2]
    cached = int((second.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    chat = _chat_rerender_prefix(engine, messages, sent, request.text, results[0])
    return {
        "question": question,
        "finish_reason": request.finish_reason,
        "first_turn": {
            "prompt_tokens": first.get("prompt_tokens"),
            "output_tokens": first.get("completion_tokens"),
        },
        "continuation": {
            "prompt_tokens": second.get("prompt_tokens"),
            "cached_tokens": cached,
            "prefill_tokens": second.get("prompt_tokens", 0) - cached,
        },
        "chat_rerender": chat,
    }


def _chat_rerender_prefix(
    engine: RemoteEngine, messages: list[dict], sent: str, output: str, result: Any
) -> dict[str, int]:
    """Leading tokens shared by the prompt sent and the chat-API rendering of the same conversation."""
    tok = engine.tokenizer
    sent_ids = tok.encode(sent, add_special_tokens=False)
    call = {"type": "function", "function": {"name": result.name, "arguments": _arguments(output)}}
    spec = engine.driver.executor.registry.get("calculator").spec()
    chat = tok.apply_chat_template(
        messages
        + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": result.content},
        ],
        tools=[spec],
        add_generation_prompt=True,
        tokenize=False,
    )
    rendered = tok.encode(chat, add_special_tokens=False)
    common = len(os.path.commonprefix([sent_ids, rendered]))  # works on any sequences
    return {
        "prompt_tokens": len(rendered),
        "common_prefix_tokens": common,
        "min_prefill_tokens": len(rendered) - common,
    }


def _arguments(text: str) -> dict[str, Any]:
    start = text.find("{")
    try:
        return json.loads(text[start : text.rfind("}") + 1]).get("arguments", {}) if start >= 0 else {}
    except ValueError:
        return {}


def _counters(url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    return {name: float(value) for name, value in _COUNTERS.findall(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the remote engine's base URL")
    parser.add_argument(
        "--model", default="default", help="the same model locally (tokenizer, chat template)"
    )
    parser.add_argument(
        "--dialect",
        default="llama.cpp",
        choices=BACKEND_DIALECTS,
        help="how the named call is constrained on the remote engine (BackendConfig.backend_dialect)",
    )
    parser.add_argument(
        "--json", default="docs/results/remote-continuation.json", help="where to write the results"
    )
    args = parser.parse_args()
    data = run_continuation_bench(args.url, args.model, dialect=args.dialect)
    write_json(Path(args.json), data)
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
