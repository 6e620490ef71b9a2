"""An async load generator for OpenAI-compatible servers (loopback only): Poisson arrivals at
a given request rate, bounded in request count and time; streams each answer and records
time to first token, inter-token gaps and output tokens (from the usage chunk)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx


@dataclass(slots=True)
class Sample:
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    ok: bool = False


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load generator only talks to loopback servers, not {host!r}")


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    sample, start = Sample(), time.perf_counter()
    last = start
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return sample
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                sample.num_output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if sample.ttft_s == 0.0:
                    sample.ttft_s = now - start
                else:
                    sample.itl_s.append(now - last)
                last = now
    sample.ok = sample.ttft_s > 0
    return sample


async def run_load(
    url: str,
    model: str,
    prompts: list[str],
    rate: float,
    num_requests: int,
    max_tokens: int,
    duration_s: float,
    seed: int = 0,
) -> tuple[list[Sample], float]:
    """Send `num_requests` (at most `duration_s` of arrivals) at `rate` req/s; returns the
    samples and the wall time until the last answer."""
    check_loopback(url)
    rng = random.Random(seed)
    start = time.perf_counter()
    tasks = []
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=512)
    ) as client:
        for i in range(num_requests):
            if time.perf_counter() - start > duration_s:
                break
            tasks.append(asyncio.create_task(_one(client, url, model, prompts[i % len(prompts)], max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))  # arrival process, not synchronisation
        samples = await asyncio.gather(*tasks)
    return list(samples), time.perf_counter() - start


def summarize(samples: list[Sample], wall_s: float) -> dict:
    def pct(values: list[float], q: float) -> float:
        if not values:
            return 0.0
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok]
    itl = [x for s in ok for x in s.itl_s]
    tokens = sum(s.num_output_tokens for s in ok)
    return {
        "num_requests": len(samples),
        "num_ok": len(ok),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "ttft_s": {f"p{int(q * 100)}": round(pct(ttft, q), 4) for q in (0.5, 0.9, 0.99)},
        "itl_s": {f"p{int(q * 100)}": round(pct(itl, q), 4) for q in (0.5, 0.9, 0.99)},
    }
