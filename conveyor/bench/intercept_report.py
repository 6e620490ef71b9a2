"""The intercept benchmark's report: throughput at a normalized-latency bound per policy,
the ratios the issue asks for, a table (Markdown) and a plot of normalized latency vs rate."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from conveyor.bench.results import save_figure, write_json, write_text

FIXED = ("preserve", "discard", "swap")


def summarize(result: dict) -> dict:
    """Per policy, the most completed requests/s among the rates whose normalized latency stays
    within the bound (factor x the lowest normalized latency at the lowest rate); and the ratios
    of auto to the new-request baseline and to the best fixed policy."""
    runs = result["runs"]
    lowest_rate = min(r["rate"] for r in runs)
    floor = min(r["normalized_latency_s"] for r in runs if r["rate"] == lowest_rate)
    bound = result["config"]["latency_bound_factor"] * floor
    best: dict[str, float] = {}
    for r in runs:
        if r["normalized_latency_s"] <= bound:
            best[r["policy"]] = max(best.get(r["policy"], 0.0), r["requests_per_s"])
    auto = best.get("auto", 0.0)
    fixed = max((best.get(p, 0.0) for p in FIXED), default=0.0)
    ratio = lambda a, b: a / b if b else None
    return {"latency_bound_s": bound, "requests_per_s_within_bound": best,
            "auto_vs_new_request": ratio(auto, best.get("new-request", 0.0)),
            "auto_vs_best_fixed": ratio(auto, fixed)}


def write_report(result: dict, json_path: Path) -> None:
    """Write the JSON (atomically), the Markdown table next to it and the plot; print the table."""
    result["summary"] = summarize(result)
    write_json(json_path, result)
    write_text(json_path.with_suffix(".md"), METHOD + _setup(result) + markdown(result) + _verdict(result))
    plot(result, json_path.with_suffix(".png"))
    console = Console()
    rich_table = Table("policy", "rate", "req/s", "tok/s", "norm. latency s/tok", "recompute share")
    for r in result["runs"]:
        rich_table.add_row(r["policy"], f"{r['rate']:g}", f"{r['requests_per_s']:.3f}",
                           f"{r['output_tokens_per_s']:.1f}", f"{r['normalized_latency_s']:.3f}",
                           f"{r['recompute_share']:.1%}")
    console.print(rich_table)
    console.print(result["summary"])


def markdown(result: dict) -> str:
    header = ("| policy | rate (req/s) | completed req/s | output tok/s | normalized latency (s/token) "
              "| recompute share of forward time | swap time (s) | preemptions |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['policy']} | {r['rate']:g} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} "
                     f"| {r['normalized_latency_s']:.3f} | {r['recompute_share']:.1%} | {r['swap_s']:.2f} "
                     f"| {r['num_preemptions']} |")
    return "\n".join(lines) + "\n"


METHOD = """# Interception-aware KV management under load (`conveyor bench intercept`)

What happens to the KV cache of a request while it waits on a tool (core/intercept.py):
**preserve** keeps it on the device, **discard** frees it and prefills the context again on
resume (chunked within the step budget), **swap** copies it to a host block pool and back
before resume, **auto** picks per request and per step the choice of least memory waste
(InferCept, ICML 2024), and **new-request** behaves like today's servers: the tool call ends
the request and the continuation is a new request (last in line, no prefix cache) that
prefills everything. Requests arrive by a Poisson process; each calls tools of one kind
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
    return (f"Setup: model `{c['model']}` cut to its first {c['num_layers']} layers ({c['dtype']}; 0 = all "
            f"layers), {c['num_requests']} requests per run, at most {c['max_calls']} tool calls each, "
            f"{c['segment_tokens'][0]}-{c['segment_tokens'][1]} tokens between calls, prompts of "
            f"{c['prompt_tokens'][0]}-{c['prompt_tokens'][1]} tokens, tool times x {c['time_scale']}, "
            f"{c['num_blocks']} device KV blocks of 16 tokens, {c['num_host_blocks']} host blocks, "
            f"token budget {c['max_num_batched_tokens']}. Load average at the end: {load} "
            f"(a shared 2-core machine).\n\n")


def _verdict(result: dict) -> str:
    s = result["summary"]
    within = ", ".join(f"{p} {v:.3f}" for p, v in s["requests_per_s_within_bound"].items())
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
    return (f"\nNormalized latency bound: {s['latency_bound_s']:.3f} s/token. Completed requests/s within it: "
            f"{within}. auto vs new-request: {fmt(s['auto_vs_new_request'])}; auto vs the best fixed policy: "
            f"{fmt(s['auto_vs_best_fixed'])}.\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in result["runs"]):
        runs = sorted((r for r in result["runs"] if r["policy"] == policy), key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in runs], [r["normalized_latency_s"] for r in runs], marker="o", label=policy)
    ax.axhline(result["summary"]["latency_bound_s"], color="grey", linestyle="--", linewidth=1, label="bound")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("normalized latency (s per output token)")
    ax.set_yscale("log")
    c = result["config"]
    ax.set_title(f"intercept policies, {c['model']}" + (f" ({c['num_layers']} layers)" if c["num_layers"] else ""))
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)

