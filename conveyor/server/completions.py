"""/v1/completions: plain text in (or token ids), text out; no chat template, no tools.

`prompt` may be a batch (a list of texts or of token-id lists): each prompt gets `n` choices,
numbered as OpenAI numbers them (prompt j's choice i is `index` j * n + i), each its own engine
request (see server/choices.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from conveyor.server.choices import all_of, interleave, total_usage
from conveyor.server.client import EngineFailed, OutputStream
from conveyor.server.logprobs import LegacyLogprobs
from conveyor.server.protocol import CompletionRequest


async def _outputs(stream: OutputStream, metrics: Any, usage: dict[str, Any]) -> AsyncIterator[Any]:
    """The choice's engine outputs; fills `usage` at the end. Aborts the request when closed early."""
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
            yield out
    finally:
        await stream.aclose()


def _body(request_id: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _choice(index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _echo(body: CompletionRequest, index: int) -> str:
    """The prompt text that choice `index` repeats before its completion (`echo`)."""
    return body.prompts[index // body.n] if body.echo else ""  # echo needs text prompts (protocol.py)


async def _complete_one(body: CompletionRequest, index: int, stream: OutputStream, metrics: Any) -> tuple:
    usage: dict[str, Any] = {}
    parts, reason, entries = [_echo(body, index)], None, []
    async for out in _outputs(stream, metrics, usage):
        parts.append(out.new_text)
        entries.extend(out.logprobs or ())
        reason = out.finish_reason if out.finished else None
    logprobs = LegacyLogprobs().take(entries) if body.logprobs is not None else None
    return _choice(index, "".join(parts), logprobs, reason), usage


async def complete_text(
    request_id: str, model: str, body: CompletionRequest, streams: list[OutputStream], metrics: Any
) -> dict[str, Any]:
    """The whole response: one choice per stream, in index order."""
    try:
        done = await all_of([_complete_one(body, i, s, metrics) for i, s in enumerate(streams)])
    finally:
        for stream in streams:
            await stream.aclose()
    usage = total_usage([u for _, u in done], list(range(0, len(streams), body.n)))
    return {**_body(request_id, model, [c for c, _ in done]), "usage": usage}


async def _chunks_one(body: CompletionRequest, index: int, stream: OutputStream, metrics: Any, usage: dict):
    """One choice's (choice, has content) pieces; the echoed prompt comes first."""
    offsets = LegacyLogprobs(len(_echo(body, index)))
    if body.echo:
        yield _choice(index, _echo(body, index), None, None)
    async for out in _outputs(stream, metrics, usage):
        logprobs = offsets.take(out.logprobs or []) if body.logprobs is not None else None
        reason = out.finish_reason if out.finished else None
        if out.new_text or reason or (logprobs and logprobs["tokens"]):
            yield _choice(index, out.new_text, logprobs, reason)


async def stream_text(
    request_id: str, model: str, body: CompletionRequest, streams: list[OutputStream], metrics: Any
) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usages: list[dict[str, Any]] = [{} for _ in streams]
    pieces = [_chunks_one(body, i, s, metrics, usages[i]) for i, s in enumerate(streams)]
    try:
        async with aclosing(interleave(pieces)) as merged:  # closed early: its tasks end too
            async for _, choice in merged:
                yield {**_body(request_id, model, [choice]), **({"usage": None} if include_usage else {})}
    finally:
        for stream in streams:
            await stream.aclose()
    if include_usage:
        usage = total_usage(usages, list(range(0, len(streams), body.n)))
        yield {**_body(request_id, model, []), "usage": usage}
