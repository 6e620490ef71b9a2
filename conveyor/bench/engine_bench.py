"""`conveyor bench engine`: decode and prefill speed against llama.cpp and transformers, in one run.

For a GGUF model Conveyor runs twice, on its native weights (the file's quantized blocks) and on
bf16 weights de-quantized from them; llama.cpp's server runs on the same file with the same
threads, prompts and new tokens (``llamacpp_peer.py``). transformers runs on the bf16 weights, at
its best: its bf16 and fp32 rows are both measured and the faster is the baseline at each
concurrency. Each side gets the same
explicit warm-up (one generation of ``--warmup-tokens`` per concurrency) and ``--repeats`` timed
runs; the median is compared and the spread reported. Decode speed counts the tokens after each
request's first one, over the time after every request has its first token, so prefill is
measured apart. The memory-bandwidth ceiling of batch-1 decode (bytes read per token / bytes
per second this machine streams, measured right before and after Conveyor's decode rows, the
higher kept) is measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from conveyor.bench.engine_report import report
from conveyor.bench.llamacpp_peer import llama_server, llamacpp_decode
from conveyor.bench.llamacpp_peer import peak_rss_mb as child_peak_rss_mb
from conveyor.bench.results import write_json
from conveyor.bench.step_profile import profile_decode
from conveyor.config import engine_config_from_flags
from conveyor.core.request import SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.engine.model.kernels import cpu_flags, cpu_model
from conveyor.engine.model.linear import Linear
from conveyor.engine.model.llama import GGUF_NAME
from conveyor.engine.model.loader import resolve_model
from conveyor.engine.model.qlinear import QuantLinear

TOPICS = [
    "a lighthouse",
    "paged memory",
    "a chess opening",
    "river deltas",
    "compilers",
    "a bakery",
    "volcanoes",
    "the number zero",
]


def add_engine_bench_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `conveyor bench engine` (the engine's own flags are added by the CLI)."""
    parser.add_argument("--json", default="docs/results/engine.json", help="where to write the results")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per request")
    parser.add_argument("--prefill-tokens", type=int, default=1000, help="prompt length of the prefill test")
    parser.add_argument(
        "--hf-max-concurrency",
        type=int,
        default=32,
        help="skip the transformers baseline above this concurrency",
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=[1, 8],
        help="concurrencies at which to split a decode step's time",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per row (median and spread reported)"
    )
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=8,
        help="tokens of the untimed generation each side runs first at each concurrency",
    )
    parser.add_argument(
        "--hf-dtypes",
        nargs="+",
        default=["bfloat16", "float32"],
        choices=["bfloat16", "float32"],
        help="transformers dtypes to measure; the faster at each concurrency is the baseline",
    )
    parser.add_argument(
        "--weights-compared",
        nargs="+",
        default=["native", "bf16"],
        choices=["native", "bf16"],
        help="GGUF models: the Conveyor weights to measure, in this order (the first is the "
        "headline row; its peak RSS is its own)",
    )
    parser.add_argument(
        "--llamacpp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GGUF models: measure llama.cpp's server (xllamacpp) on the same file and threads",
    )


def prompts(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]} (essay {i})."}]
        for i in range(n)
    ]


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
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        model.generate(
            **batch,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        return time.perf_counter() - start

    first = timed(1)
    return n * (new_tokens - 1) / (timed(new_tokens) - first)


def repeated(measure, warmup, repeats: int) -> dict:
    """``warmup()`` once, then ``measure()`` ``repeats`` times: median, min, max."""
    warmup()
    values = [measure() for _ in range(repeats)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def memory_bandwidth_gb_s() -> float:
    """Best of five streaming reads of a 1 GiB tensor."""
    a = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident set since the last ``reset_peak_rss`` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak from the current resident set (Linux >= 4.0), so the 1 GiB bandwidth
    probe and the previous engine do not count in an engine's peak; no-op where unsupported."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def bytes_per_token(engine: LLMEngine) -> int:
    """Bytes a one-row decode step reads: every weight but the embedding table (one row of it),
    each layer's in the form its one-row path reads (an fp32-packed copy for oneDNN, the
    quantized blocks of a native layer)."""
    model = engine.runner.model
    embed = {id(p) for p in model.embed.parameters()}
    total = sum(p.nbytes for p in model.parameters() if id(p) not in embed)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes
        if isinstance(m, Linear) and m.plan and m.plan[0] == "onednn" and m.weight.element_size() < 4:
            total += m.weight.numel() * (4 - m.weight.element_size())
    return total


def run_engine_bench(args: argparse.Namespace) -> dict:
    console = Console()
    config = engine_config_from_flags(args)
    result: dict = {
        "command": shlex.join(["conveyor", *sys.argv[1:]]),
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "cpu": cpu_model(),
        "isa": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
        "new_tokens": args.new_tokens,
        "warmup_tokens": args.warmup_tokens,
        "repeats": args.repeats,
        "conveyor": {},
    }
    model_dirs: list[Path] = []
    for weights in args.weights_compared:
        reset_peak_rss()
        engine = LLMEngine(
            dataclasses.replace(config, model=dataclasses.replace(config.model, weights=weights))
        )
        if engine.model_dir in model_dirs:  # a safetensors model runs as stored whatever --weights says
            continue
        model_dirs.append(engine.model_dir)
        label = "native" if (engine.model_dir / GGUF_NAME).is_file() else "bf16"
        result["conveyor"][label] = _conveyor_rows(engine, args, console, label)
        result["threads"] = torch.get_num_threads()
        del engine
        gc.collect()
    primary = next(iter(result["conveyor"].values()))
    result.update(
        {
            k: primary[k]
            for k in (
                "linear_choices",
                "prefill_tok_s",
                "step_profile_ms",
                "peak_rss_mb",
                "memory_bandwidth_gb_s",
                "bytes_per_token",
            )
        }
    )
    result["conveyor_tok_s"], result["prefill_tokens"] = primary["tok_s"], args.prefill_tokens
    gguf = next((d / GGUF_NAME for d in model_dirs if (d / GGUF_NAME).is_file()), None)
    if gguf is not None and args.llamacpp:
        result["llamacpp"] = _llamacpp_rows(gguf, args, result["threads"], console)
    bf16_dir = next((d for d in model_dirs if not (d / GGUF_NAME).is_file()), None) or resolve_model(
        args.model, progress=False, weights="bf16"
    )
    result["hf_tok_s"] = _hf_rates(bf16_dir, args, console)
    result["load_average_after"] = os.getloadavg()
    _summarise(result)
    report(console, result)
    write_json(Path(args.json), result, indent=2)
    console.print(f"wrote {args.json}")
    return result


def _conveyor_rows(engine: LLMEngine, args: argparse.Namespace, console: Console, label: str) -> dict:
    """Decode rows, prefill and step profile of one engine; its peak RSS from its load to its last
    row, the bandwidth probes left out (``reset_peak_rss`` after each)."""
    new, warm, reps = args.new_tokens, args.warmup_tokens, args.repeats
    peaks = [peak_rss_mb()]  # the load
    bandwidth_before = memory_bandwidth_gb_s()
    reset_peak_rss()
    with console.status(f"conveyor {label}: decode"):
        rates = {
            c: repeated(
                lambda c=c: conveyor_decode(engine, c, new),
                lambda c=c: conveyor_decode(engine, c, warm),
                reps,
            )
            for c in args.concurrency
        }
    peaks.append(peak_rss_mb())
    bandwidth_after = memory_bandwidth_gb_s()
    reset_peak_rss()
    with console.status(f"conveyor {label}: prefill"):
        prefill = conveyor_prefill(engine, args.prefill_tokens)
    with console.status(f"conveyor {label}: decode step profile"):
        step_profile = [profile_decode(engine, c) for c in args.profile]
    return {
        "tok_s": rates,
        "prefill_tok_s": prefill,
        "step_profile_ms": step_profile,
        "peak_rss_mb": max(*peaks, peak_rss_mb()),
        "memory_bandwidth_gb_s": {"before": bandwidth_before, "after": bandwidth_after},
        "bytes_per_token": bytes_per_token(engine),
        "linear_choices": engine.runner.linear_choices,
        "model_dir": str(engine.model_dir),
    }


def _llamacpp_rows(gguf: Path, args: argparse.Namespace, threads: int, console: Console) -> dict:
    """llama.cpp's server on the same file and threads: decode rows and its peak RSS."""
    rates = {}
    with (
        console.status("llama.cpp: starting its server"),
        llama_server(gguf, threads, max(args.concurrency)) as (url, pid),
    ):
        for c in args.concurrency:
            with console.status(f"llama.cpp: decode at concurrency {c}"):
                rates[c] = repeated(
                    lambda c=c: llamacpp_decode(url, prompts(c), args.new_tokens),
                    lambda c=c: llamacpp_decode(url, prompts(c), args.warmup_tokens),
                    args.repeats,
                )
        rss = child_peak_rss_mb(pid)
    return {"tok_s": rates, "peak_rss_mb": rss, "threads": threads, "gguf": str(gguf)}


def _summarise(result: dict) -> None:
    """Per concurrency: each engine's median, the transformers baseline (the faster dtype) and the
    ratios; the bandwidth ceiling of the primary Conveyor engine and its concurrency-1 share."""
    for entry in result["conveyor"].values():
        entry["bandwidth_ceiling_tok_s"] = (
            max(entry["memory_bandwidth_gb_s"].values()) * 1e9 / entry["bytes_per_token"]
        )
    result["bandwidth_ceiling_tok_s"] = next(iter(result["conveyor"].values()))["bandwidth_ceiling_tok_s"]
    llamacpp = result.get("llamacpp", {}).get("tok_s", {})
    rows = []
    for c, ours in result["conveyor_tok_s"].items():
        hf = {dtype: rates[c]["median"] for dtype, rates in result["hf_tok_s"].items() if c in rates}
        best = max(hf, key=hf.__getitem__) if hf else None
        row = {
            "concurrency": c,
            "conveyor_tok_s": ours["median"],
            "hf_best_dtype": best,
            "hf_tok_s": hf[best] if best else None,
            "ratio": ours["median"] / hf[best] if best else None,
            "by_weights": {w: e["tok_s"][c]["median"] for w, e in result["conveyor"].items()},
        }
        if c in llamacpp:
            row["llamacpp_tok_s"] = llamacpp[c]["median"]
            row["ratio_to_llamacpp"] = ours["median"] / llamacpp[c]["median"]
        rows.append(row)
    result["rows"] = rows
    if 1 in result["conveyor_tok_s"]:
        result["c1_share_of_ceiling"] = (
            result["conveyor_tok_s"][1]["median"] / result["bandwidth_ceiling_tok_s"]
        )


def _hf_rates(model_dir: Path, args: argparse.Namespace, console: Console) -> dict[str, dict[int, dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rates: dict[str, dict[int, dict]] = {}
    for dtype in args.hf_dtypes:
        model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            .to(args.device)
            .eval()
        )
        rates[dtype] = {}
        with torch.inference_mode():
            for c in args.concurrency:
                if c <= args.hf_max_concurrency:
                    with console.status(f"transformers {dtype}: decode at concurrency {c}"):
                        rates[dtype][c] = repeated(
                            lambda c=c, m=model: hf_decode(m, tokenizer, c, args.new_tokens),
                            lambda c=c, m=model: hf_decode(m, tokenizer, c, args.warmup_tokens),
                            args.repeats,
                        )
        del model
    return rates
