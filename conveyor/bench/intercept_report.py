"""The intercept benchmark's report: throughput at a normalized-latency bound per policy,
the ratios the issue asks for, a table (Markdown) and a plot of normalized latency vs rate."""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from conveyor.bench.results import save_figure, write_json, write_text

FIXED = ("preserve", "discard", "swap")
BASELINE = "new-request"  # today's servers: the continuation is a new request, with the prefix cache
RATIOS = {
    "auto_vs_new_request": BASELINE,
    "auto_vs_new_request_no_cache": "new-request-no-cache",
    "auto_vs_best_fixed": FIXED,
}


def summarize(result: dict) -> dict:
    """Per seed: each policy's most completed requests/s among the rates whose normalized latency
    stays within the bound (factor x the seed's lowest normalized latency at the lowest rate), and
    without the bound (at any rate); the ratios of auto to the baselines per seed; their median,
    min and max over the seeds."""
    per_seed = {
        seed: _seed_summary(
            [r for r in result["runs"] if r.get("seed", 0) == seed], result["config"]["latency_bound_factor"]
        )
        for seed in sorted({r.get("seed", 0) for r in result["runs"]})
    }
    spread = {}
    for bound in ("within_bound", "unbounded"):
        for name in RATIOS:
            values = [s[bound][name] for s in per_seed.values() if s[bound][name] is not None]
            spread[f"{name}_{bound}"] = _spread(values)
    return {"per_seed": per_seed, "ratios": spread}


def _seed_summary(runs: list[dict], factor: float) -> dict:
    lowest_rate = min(r["rate"] for r in runs)
    bound = factor * min(r["normalized_latency_s"] for r in runs if r["rate"] == lowest_rate)
    within = _best(r for r in runs if r["normalized_latency_s"] <= bound)
    unbounded = _best(runs)
    return {
        "latency_bound_s": bound,
        "requests_per_s_within_bound": within,
        "requests_per_s_unbounded": unbounded,
        "within_bound": _ratios(within),
        "unbounded": _ratios(unbounded),
    }


def _best(runs) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in runs:
        best[r["policy"]] = max(best.get(r["policy"], 0.0), r["requests_per_s"])
    return best


def _ratios(best: dict[str, float]) -> dict[str, float | None]:
    auto = best.get("auto", 0.0)
    out = {}
    for name, base in RATIOS.items():
        value = (
            max((best.get(p, 0.0) for p in base), default=0.0)
            if isinstance(base, tuple)
            else best.get(base, 0.0)
        )
        out[name] = auto / value if value else None
    return out


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_report(result: dict, json_path: Path) -> None:
    """Write the JSON (atomically), the Markdown table next to it and the plot; print the table."""
    result["summary"] = summarize(result)
    write_json(json_path, result)
    write_text(json_path.with_suffix(".md"), METHOD + _setup(result) + markdown(result) + _verdict(result))
    plot(result, json_path.with_suffix(".png"))
    console = Console()
    rich_table = Table("policy", "rate", "seed", "req/s", "tok/s", "norm. latency s/tok", "recompute share")
    for r in result["runs"]:
        rich_table.add_row(
            r["policy"],
            f"{r['rate']:g}",
            str(r.get("seed", 0)),
            f"{r['requests_per_s']:.3f}",
            f"{r['output_tokens_per_s']:.1f}",
            f"{r['normalized_latency_s']:.3f}",
            f"{r['recompute_share']:.1%}",
        )
    console.print(rich_table)
    console.print(result["summary"]["ratios"])


def markdown(result: dict) -> str:
    """Per policy and rate, over the seeds: the mean, and [min, max] where there are several."""
    header = (
        "| policy | rate (req/s) | seeds | completed req/s | output tok/s | normalized latency (s/token) "
        "| recompute share of forward time | swap time (s) | preemptions | unfinished |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["policy"], r["rate"]), []).append(r)
    for (policy, rate), runs in sorted(groups.items(), key=lambda kv: (_order(result, kv[0][0]), kv[0][1])):
        cell = lambda key, fmt, runs=runs: _cell([r[key] for r in runs], fmt)
        unfinished = sum(r.get("num_requests", r["num_completed"]) - r["num_completed"] for r in runs)
        lines.append(
            f"| {policy} | {rate:g} | {len(runs)} | {cell('requests_per_s', '.3f')} "
            f"| {cell('output_tokens_per_s', '.1f')} | {cell('normalized_latency_s', '.3f')} "
            f"| {cell('recompute_share', '.1%')} | {cell('swap_s', '.2f')} | {cell('num_preemptions', '.0f')} "
            f"| {unfinished} |"
        )
    return "\n".join(lines) + "\n"


def _order(result: dict, policy: str) -> int:
    names = list(dict.fromkeys(r["policy"] for r in result["runs"]))
    return names.index(policy)


def _cell(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


METHOD = """# Interception-aware KV management under load (`conveyor bench intercept`)

What happens to the KV cache of a request while it waits on a tool (core/intercept.py):
**preserve** keeps it on the device, **discard** frees it and prefills the context again on
resume (chunked within the step budget), **swap** copies it to a host block pool and back
before resume, **auto** picks per request and per step the choice of least memory waste
(InferCept, ICML 2024), and **new-request** behaves like today's servers: the tool call ends
the request and the continuation is a new request (last in line) that prefills whatever the
prefix cache no longer holds; **new-request-no-cache** is the same without a prefix cache (it
prefills everything: the weaker baseline of the earlier figure). Every policy runs with prefix
caching except that one. Requests arrive by a Poisson process; each calls tools of one kind
between decode segments, the tool times drawn from the InferCept workload mix (scaled); the
benchmark pauses a request at each call and resumes it with the result tokens when the
sampled time has passed. Every policy serves the same requests at each rate.

Sources. From the InferCept paper (Abhyankar et al., ICML 2024, arXiv 2402.01869): the three
choices and the idea of ranking them by memory waste, the baseline that ends the request at
each call (its reported 37-40% of forward time spent recomputing), the six workload kinds and
the normalized latency (end-to-end latency per output token, tool time included). From its code
(github.com/WukLab/InferCept, `vllm/core/scheduler_v2.py`): preserve waste = remaining tool
time x blocks held; discard waste charged for the memory of the running batch during the
recompute (`discard_waste`); per-step swap-in/out budgets in blocks (`max_swap_in_blocks`,
`max_swap_out_blocks`); running, swapped and waiting queues each sorted by arrival, waiting
requests admitted only when none is swapped. Our swap waste charges the copy time like a
recompute (a CPU does not overlap copies with the forward pass, unlike InferCept's GPU
pipelining), and the budget comes from a copy timed at start-up, not from a profile. The tool
times, calls per request and result lengths of the mix (`MIX` in `conveyor/bench/intercept.py`)
are the paper's Table 1 figures as we read them; the dataset behind them is not in the
repository, so they were not checked against it here.

"""


def _setup(result: dict) -> str:
    c = result["config"]
    load = ", ".join(f"{x:.1f}" for x in result["loadavg"])
    learned = (
        "each kind's true mean time given to auto"
        if c.get("declared_times")
        else "auto learning tool times from a running mean of past calls"
    )
    cap = (
        f", each run ended after {c['max_run_s']:g} s (what was left aborted and counted unfinished)"
        if c.get("max_run_s")
        else ""
    )
    return (
        f"Setup: model `{c['model']}` cut to its first {c['num_layers']} layers ({c['dtype']}; 0 = all "
        f"layers), {c['num_requests']} requests per run, seeds {c.get('seeds')}, rates {c['rates']} req/s, "
        f"at most {c['max_calls']} tool calls each, "
        f"{c['segment_tokens'][0]}-{c['segment_tokens'][1]} tokens between calls, prompts of "
        f"{c['prompt_tokens'][0]}-{c['prompt_tokens'][1]} tokens, tool times x {c['time_scale']}, "
        f"{c['num_blocks']} device KV blocks of 16 tokens, {c['num_host_blocks']} host blocks, "
        f"token budget {c['max_num_batched_tokens']}, {learned}{cap}. Policies interleaved (one engine each, "
        f"warmed up alike; the order rotates from one rate and seed to the next). "
        f"CPU: {result.get('machine', {}).get('cpu_model', 'not recorded')}. Load average at the end: {load} "
        f"(a shared 2-core machine). Command: `{result.get('command', 'not recorded')}`.\n\n"
    )


def _verdict(result: dict) -> str:
    s = result["summary"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
    lines = [
        "",
        "| ratio (median [min, max] over seeds) | within the latency bound | without a bound |",
        "|---|---|---|",
    ]
    for name in RATIOS:
        cells = [s["ratios"][f"{name}_{b}"] for b in ("within_bound", "unbounded")]
        lines.append(
            f"| {name.replace('_', ' ')} | "
            + " | ".join(f"{fmt(c['median'])} [{fmt(c['min'])}, {fmt(c['max'])}] (n={c['n']})" for c in cells)
            + " |"
        )
    bounds = ", ".join(f"seed {k}: {v['latency_bound_s']:.3f}" for k, v in s["per_seed"].items())
    return "\n".join(lines) + f"\n\nNormalized latency bounds (s/token), per seed: {bounds}.\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in result["runs"]):
        rates = sorted({r["rate"] for r in result["runs"] if r["policy"] == policy})
        values = [
            [r["normalized_latency_s"] for r in result["runs"] if r["policy"] == policy and r["rate"] == x]
            for x in rates
        ]
        means = [sum(v) / len(v) for v in values]
        spread = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        ax.errorbar(rates, means, yerr=spread, marker="o", capsize=3, label=policy)
    bounds = [v["latency_bound_s"] for v in result["summary"]["per_seed"].values()]
    ax.axhline(sum(bounds) / len(bounds), color="grey", linestyle="--", linewidth=1, label="bound (mean)")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("normalized latency (s per output token)")
    ax.set_yscale("log")
    c = result["config"]
    ax.set_title(
        f"intercept policies, {c['model']}"
        + (f" ({c['num_layers']} layers)" if c["num_layers"] else "")
        + ": mean, min-max over seeds",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
