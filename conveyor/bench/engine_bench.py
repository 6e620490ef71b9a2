"""`conveyor bench engine`: decode and prefill speed against transformers, in one run.

Both engines use the same weights and dtype. Decode speed counts the tokens after
each request's first one, over the time after every request has its first token,
so prefill is measured apart. The memory-bandwidth ceiling of batch-1 decode
(bytes of weights read per token / bytes per second this machine streams) is
measured in the same run.
"""
from __future__ import annotations

import argparse
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from conveyor.config import engine_config_from_flags
from conveyor.engine.engine import LLMEngine
from conveyor.bench.step_profile import profile_decode
from conveyor.bench.results import write_json
from conveyor.engine.request import SamplingParams

TOPICS = ["a lighthouse", "paged memory", "a chess opening", "river deltas", "compilers", "a bakery",
          "volcanoes", "the number zero"]


@dataclass(slots=True)
class Row:
    concurrency: int
    conveyor_tok_s: float
    hf_tok_s: float | None
    ratio: float | None


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]} (essay {i})."}]
            for i in range(n)]


def conveyor_decode(engine: LLMEngine, n: int, new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    requests = [engine.get_request(engine.add_request(p, params)) for p in prompts(n)]
    while any(not r.output_token_ids for r in requests):
        engine.step()
    start, done = time.perf_counter(), sum(len(r.output_token_ids) for r in requests)
    while engine.has_unfinished:
        engine.step()
    return (sum(len(r.output_token_ids) for r in requests) - done) / (time.perf_counter() - start)


def conveyor_prefill(engine: LLMEngine, num_tokens: int) -> float:
    ids = (engine.encode("The quick brown fox jumps over the lazy dog. ") * num_tokens)[:num_tokens]
    start = time.perf_counter()
    request = engine.get_request(engine.add_request(ids, SamplingParams(max_tokens=1, ignore_eos=True)))
    while not request.finished:
        engine.step()
    return num_tokens / (time.perf_counter() - start)


def hf_decode(model, tokenizer, n: int, new_tokens: int) -> float:
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts(n)]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id or 0)
        return time.perf_counter() - start

    first = timed(1)
    return n * (new_tokens - 1) / (timed(new_tokens) - first)


def memory_bandwidth_gb_s() -> float:
    """Best of five streaming reads of a 1 GiB tensor."""
    a = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best / 1e9


def run_engine_bench(args: argparse.Namespace) -> dict:
    console = Console()
    engine = LLMEngine(engine_config_from_flags(args))
    model = engine.runner.model   # a decode step reads every weight but the embedding table (one row each)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.embed.nbytes
    with console.status("conveyor: decode"):
        ours = {c: conveyor_decode(engine, c, args.new_tokens) for c in args.concurrency}
    with console.status("conveyor: prefill"):
        prefill = conveyor_prefill(engine, args.prefill_tokens)
    with console.status("conveyor: decode step profile"):
        step_profile = [profile_decode(engine, c) for c in args.profile]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_dir, device, dtype = engine.model_dir, engine.runner.device, engine.runner.dtype
    del engine
    hf = _hf_rates(model_dir, device, dtype, args, console)
    rows = [Row(c, ours[c], hf.get(c), ours[c] / hf[c] if c in hf else None) for c in args.concurrency]
    bandwidth = memory_bandwidth_gb_s()
    result = {
        "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "rows": [asdict(r) for r in rows], "prefill_tok_s": prefill, "peak_rss_mb": peak_rss_mb,
        "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
        "memory_bandwidth_gb_s": bandwidth, "weight_bytes_per_token": weight_bytes,
        "bandwidth_ceiling_tok_s": bandwidth * 1e9 / weight_bytes, "threads": torch.get_num_threads(),
        "step_profile_ms": step_profile,
    }
    _report(console, result, args.json)
    return result


def _hf_rates(model_dir: Path, device: torch.device, dtype: torch.dtype, args: argparse.Namespace,
              console: Console) -> dict[int, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rates = {}
    with torch.inference_mode():
        for c in args.concurrency:
            if c <= args.hf_max_concurrency:
                with console.status(f"transformers: decode at concurrency {c}"):
                    rates[c] = hf_decode(model, tokenizer, c, args.new_tokens)
    return rates


def _report(console: Console, result: dict, path: str) -> None:
    table = Table(title=f"decode tok/s, {result['model']} {result['dtype']} on {result['device']}")
    for col in ("concurrency", "conveyor", "transformers", "ratio"):
        table.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in result["rows"]:
        table.add_row(str(r["concurrency"]), fmt(r["conveyor_tok_s"]), fmt(r["hf_tok_s"]),
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}x")
    console.print(table)
    for p in result["step_profile_ms"]:
        console.print(f"decode step at concurrency {p['concurrency']}: {p['step_ms']:.1f} ms = matmuls "
                      f"{p['linear_ms']:.1f} + attention {p['attention_ms']:.1f} + other {p['other_ms']:.1f}")
    console.print(f"prefill {result['prefill_tokens']} tokens: {result['prefill_tok_s']:.1f} tok/s; "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB; memory bandwidth "
                  f"{result['memory_bandwidth_gb_s']:.1f} GB/s -> batch-1 ceiling "
                  f"{result['bandwidth_ceiling_tok_s']:.1f} tok/s")
    out = Path(path)
    write_json(out, result, indent=2)
    console.print(f"wrote {out}")
