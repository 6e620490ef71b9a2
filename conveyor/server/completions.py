"""/v1/completions: plain text in (or token ids), text out; no chat template, no tools."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from conveyor.server.client import EngineFailed, OutputStream
from conveyor.server.protocol import CompletionRequest


async def _texts(
    stream: OutputStream, metrics: Any, usage: dict[str, Any]
) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, finish_reason or None) per engine output; fills `usage` at the end."""
    arrived = last = time.perf_counter()
    first = True
    try:
        async for out in stream:
            if out.finished and out.finish_reason == "error":
                raise EngineFailed(
                    f"the engine failed this request: {getattr(out, 'error', None) or 'unknown error'}"
                )
            if out.new_token_ids:
                now = time.perf_counter()
                (metrics.ttft_s if first else metrics.itl_s).observe(now - (arrived if first else last))
                first, last = False, now
            if out.finished:
                metrics.observe_finished(out)
                usage.update(
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                    total_tokens=out.num_prompt_tokens + out.num_output_tokens,
                )
            yield out.new_text, out.finish_reason if out.finished else None
    finally:
        await stream.aclose()


def _body(request_id: str, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


async def complete_text(
    request_id: str, model: str, body: CompletionRequest, stream: OutputStream, metrics: Any
) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    parts, reason = [], None
    async for text, reason in _texts(stream, metrics, usage):
        parts.append(text)
    prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
    return {**_body(request_id, model, prefix + "".join(parts), reason), "usage": usage}


async def stream_text(
    request_id: str, model: str, body: CompletionRequest, stream: OutputStream, metrics: Any
) -> AsyncIterator[dict[str, Any]]:
    usage: dict[str, Any] = {}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    async for text, reason in _texts(stream, metrics, usage):
        if text or reason:
            yield {**_body(request_id, model, text, reason), **({"usage": None} if include_usage else {})}
    if include_usage:
        yield {**_body(request_id, model, "", None), "choices": [], "usage": usage}
