"""The console report of `conveyor bench engine` (the JSON holds the same numbers and more)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from conveyor.engine.model.linear import BUCKETS


def spread(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"


def report(console: Console, result: dict) -> None:
    console.print(f"{result['cpu']}, {result['threads']} threads, torch {result['torch']}; "
                  f"instruction sets: {' '.join(result['isa'])}; load average before "
                  f"{result['load_average_before'][0]:.2f}, after {result['load_average_after'][0]:.2f}")
    table = Table(title=f"decode tok/s, {result['model']} {result['dtype']} on {result['device']}: "
                        f"median (min-max) of {result['repeats']}")
    for col in ("concurrency", "conveyor", *(f"transformers {d}" for d in result["hf_tok_s"]), "ratio"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        c = row["concurrency"]
        hf = [spread(rates.get(c)) for rates in result["hf_tok_s"].values()]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x vs {row['hf_best_dtype']}"
        table.add_row(str(c), spread(result["conveyor_tok_s"][c]), *hf, ratio)
    console.print(table)
    choices = Table(title="matmul path per weight shape and row bucket (measured at load)")
    choices.add_column("shape")
    for label, _ in BUCKETS:
        choices.add_column(f"{label} rows")
    for shape, buckets in result["linear_choices"].items():
        choices.add_row(shape, *(buckets[label]["path"] for label, _ in BUCKETS))
    console.print(choices)
    for p in result["step_profile_ms"]:
        console.print(f"decode step at concurrency {p['concurrency']}: {p['step_ms']:.1f} ms = matmuls "
                      f"{p['linear_ms']:.1f} + attention {p['attention_ms']:.1f} + other {p['other_ms']:.1f}")
    bw = result["memory_bandwidth_gb_s"]
    console.print(f"prefill {result['prefill_tokens']} tokens: {result['prefill_tok_s']:.1f} tok/s; "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB; memory bandwidth {bw['before']:.1f} GB/s before "
                  f"and {bw['after']:.1f} after the decode rows -> batch-1 ceiling "
                  f"{result['bandwidth_ceiling_tok_s']:.1f} tok/s for {result['bytes_per_token'] / 1e6:.0f} MB "
                  f"per token" + (f"; concurrency 1 reached {result['c1_share_of_ceiling']:.0%} of it"
                                  if "c1_share_of_ceiling" in result else ""))
