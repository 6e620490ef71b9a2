"""The console report of `conveyor bench engine` (the JSON holds the same numbers and more)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from conveyor.engine.model.linear import BUCKETS


def spread(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"


def report(console: Console, result: dict) -> None:
    console.print(
        f"{result['cpu']}, {result['threads']} threads, torch {result['torch']}; "
        f"instruction sets: {' '.join(result['isa'])}; load average before "
        f"{result['load_average_before'][0]:.2f}, after {result['load_average_after'][0]:.2f}"
    )
    console.print(_rates_table(result))
    for weights, entry in result["conveyor"].items():
        console.print(_choices_table(weights, entry["linear_choices"]))
        for p in entry["step_profile_ms"]:
            console.print(
                f"conveyor {weights}: decode step at concurrency {p['concurrency']}: {p['step_ms']:.1f} ms "
                f"= matmuls {p['linear_ms']:.1f} + attention {p['attention_ms']:.1f} "
                f"+ other {p['other_ms']:.1f}"
            )
        bw = entry["memory_bandwidth_gb_s"]
        console.print(
            f"conveyor {weights}: prefill {result['prefill_tokens']} tokens: {entry['prefill_tok_s']:.1f} "
            f"tok/s; peak RSS {entry['peak_rss_mb']:.0f} MB; memory bandwidth {bw['before']:.1f} GB/s "
            f"before and {bw['after']:.1f} after its decode rows -> batch-1 ceiling "
            f"{entry['bandwidth_ceiling_tok_s']:.1f} tok/s for {entry['bytes_per_token'] / 1e6:.0f} MB "
            f"per token"
        )
    if "llamacpp" in result:
        console.print(f"llama.cpp: peak RSS {result['llamacpp']['peak_rss_mb']:.0f} MB")
    if "c1_share_of_ceiling" in result:
        console.print(
            f"concurrency 1 reached {result['c1_share_of_ceiling']:.0%} of the headline engine's ceiling"
        )


def _rates_table(result: dict) -> Table:
    table = Table(
        title=f"decode tok/s, {result['model']} on {result['device']}: median (min-max) of "
        f"{result['repeats']}"
    )
    engines = list(result["conveyor"])
    peers = [f"transformers {d}" for d in result["hf_tok_s"]]
    columns = [
        "concurrency",
        *(f"conveyor {w}" for w in engines),
        *(["llama.cpp"] if "llamacpp" in result else []),
        *peers,
        "vs llama.cpp",
        "vs transformers",
    ]
    for col in columns:
        table.add_column(col, justify="right")
    for row in result["rows"]:
        c = row["concurrency"]
        ours = [spread(result["conveyor"][w]["tok_s"].get(c)) for w in engines]
        llama = [spread(result["llamacpp"]["tok_s"].get(c))] if "llamacpp" in result else []
        hf = [spread(rates.get(c)) for rates in result["hf_tok_s"].values()]
        vs_llama = f"{row['ratio_to_llamacpp']:.2f}x" if "ratio_to_llamacpp" in row else "-"
        vs_hf = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x vs {row['hf_best_dtype']}"
        table.add_row(str(c), *ours, *llama, *hf, vs_llama, vs_hf)
    return table


def _choices_table(weights: str, linear_choices: dict) -> Table:
    choices = Table(
        title=f"conveyor {weights}: matmul path per weight shape and row bucket (measured at load)"
    )
    choices.add_column("shape")
    for label, _ in BUCKETS:
        choices.add_column(f"{label} rows")
    for shape, buckets in linear_choices.items():
        choices.add_row(shape, *(buckets[label]["path"] for label, _ in BUCKETS))
    return choices
