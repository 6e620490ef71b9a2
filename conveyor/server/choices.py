"""Several choices in one response: OpenAI's `n`, and on /v1/completions one choice per prompt
of a batch (times `n`). Each choice is its own engine request (the same prompt's requests
share its KV through the prefix cache, see core/scheduler.py); the response numbers them by
`index`, and a stream interleaves their chunks as they come."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from conveyor.config import ServerConfig
from conveyor.server import chat
from conveyor.server.chat import ChatRun
from conveyor.server.client import GenerateRequest, OutputStream
from conveyor.server.errors import ApiError
from conveyor.server.logprobs import LogprobTap, chat_logprobs

T = TypeVar("T")
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive choice numbers over the seed space
_DONE = object()


def check_choices(config: ServerConfig, n: int, num_prompts: int = 1) -> None:
    """A response's choices are engine requests: their number is bounded (400 naming the field)."""
    if n > config.max_n:
        raise ApiError(
            400, f"n is {n}; this server gives at most {config.max_n} choices per prompt (--max-n)", param="n"
        )
    if num_prompts > config.max_prompts:
        raise ApiError(
            400,
            f"prompt holds {num_prompts} prompts; this server takes at most {config.max_prompts} (--max-prompts)",
            param="prompt",
        )


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: choice 0 keeps the request's (so `n: 1` samples as before); the
    others get seeds of their own, so seeded choices differ and still repeat run to run."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _GOLDEN) % 2**63


def engine_id(request_id: str, index: int) -> str:
    """The engine request id of a response's choice `index` (choice 0 keeps the response's id)."""
    return request_id if index == 0 else f"{request_id}-{index}"


def choice_request(
    request: GenerateRequest, index: int, num_logprobs: int | None, request_id: str
) -> GenerateRequest:
    """The engine request `request_id` of a prompt's choice `index`: its own seed, the logprobs
    asked for; the prompt object is shared (EngineClient.generate_all prepares it once)."""
    params = {
        **request.params,
        "seed": choice_seed(request.params.get("seed"), index),
        "logprobs": num_logprobs,
    }
    return dataclasses.replace(request, request_id=request_id, params=params)


def with_index(chunk: dict[str, Any], index: int) -> dict[str, Any]:
    """A chunk of one choice renumbered as choice `index` of the response."""
    for choice in chunk["choices"]:
        choice["index"] = index
    return chunk


def total_usage(usages: list[dict[str, Any]], prompt_choices: list[int]) -> dict[str, Any]:
    """Usage of several choices as OpenAI counts it: each prompt once (the choices listed in
    `prompt_choices` stand for their prompts), every choice's completion."""
    prompt = sum(usages[i]["prompt_tokens"] for i in prompt_choices)
    completion = sum(u["completion_tokens"] for u in usages)
    total = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = [usages[i].get("prompt_tokens_details") for i in prompt_choices]
    if all(cached):
        total["prompt_tokens_details"] = {"cached_tokens": sum(d["cached_tokens"] for d in cached)}
    return total


async def all_of(work: list[Awaitable[T]]) -> list[T]:
    """Every result, in order; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in work]
    except ExceptionGroup as e:
        raise e.exceptions[0] from None
    return [t.result() for t in tasks]


async def interleave(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream number, item) from all `streams` as each item arrives; the first failure is
    raised. Closing it (or a failure) cancels and closes every stream."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((i, _DONE, e))
        else:
            queue.put_nowait((i, _DONE, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while (got := await queue.get())[1] is not _DONE:
                yield got[0], got[1]
            if got[2] is not None:
                raise got[2]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


# ---- chat: one ChatRun and engine stream per choice ----------------------------------------
async def chat_response(
    runs: list[ChatRun], streams: list[OutputStream], metrics: Any, logprobs: bool
) -> dict[str, Any]:
    """The whole chat response of `n` choices."""
    taps = [LogprobTap(s) for s in streams]
    try:
        bodies = await all_of([chat.complete(run, tap, metrics) for run, tap in zip(runs, taps)])
    finally:
        await _close(streams)
    response = bodies[0]
    response["choices"] = [with_index(b, i)["choices"][0] for i, b in enumerate(bodies)]
    if logprobs:
        for choice, tap in zip(response["choices"], taps):
            choice["logprobs"] = chat_logprobs(tap.take())
    response["usage"] = total_usage([b["usage"] for b in bodies], [0])
    return response


async def chat_stream(
    runs: list[ChatRun], streams: list[OutputStream], metrics: Any, logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of `n` streamed choices, interleaved, each with its `index`; then one usage
    chunk for them all when asked."""
    for run in runs:
        run.include_usage = False  # one usage chunk for all the choices, below
    taps = [LogprobTap(s) for s in streams]
    choices = [_chat_chunks(run, tap, metrics, logprobs) for run, tap in zip(runs, taps)]
    try:
        async with aclosing(interleave(choices)) as merged:  # closed early: its tasks end too
            async for i, chunk in merged:
                yield {**with_index(chunk, i), **({"usage": None} if include_usage else {})}
    finally:
        await _close(streams)
    if include_usage:
        yield {**chat.chunk(runs[0], None), "usage": total_usage([r.usage for r in runs], [0])}


async def _chat_chunks(run: ChatRun, tap: LogprobTap, metrics: Any, logprobs: bool) -> AsyncIterator[dict]:
    async for chunk in chat.stream_chunks(run, tap, metrics):
        entries = tap.take()
        if logprobs and entries and chunk["choices"]:
            chunk["choices"][0]["logprobs"] = chat_logprobs(entries)
        yield chunk


async def _close(streams: list[OutputStream]) -> None:
    """Abort every choice still running (one whose work never started included)."""
    for stream in streams:
        await stream.aclose()
