"""The intercept benchmark's workload and summary (no model: the load run itself is the benchmark)."""

from __future__ import annotations

import argparse
import itertools

import pytest

from conveyor.bench.intercept import MIX, add_intercept_flags, make_jobs
from conveyor.bench.intercept_report import markdown, summarize


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_intercept_flags(parser)
    return parser.parse_args(list(argv))


def test_jobs_follow_the_mix_and_the_caps() -> None:
    args = bench_args("--num-requests", "40", "--max-calls", "3", "--time-scale", "0.5")
    jobs = make_jobs(2.0, args, vocab=1000, seed=1)
    assert len(jobs) == 40 and make_jobs(2.0, args, vocab=1000, seed=1) == jobs  # seeded
    assert all(a.arrival_s < b.arrival_s for a, b in itertools.pairwise(jobs))
    shapes = {s.name: s for s in MIX}
    for job in jobs:
        assert 1 <= len(job.calls) <= 3 and 32 <= len(job.prompt_ids) <= 128
        marks = [c.after_tokens for c in job.calls]
        assert marks == sorted(set(marks)) and marks[-1] < job.num_output_tokens
        for call in job.calls:
            shape = shapes[call.tool]
            assert call.declared_s == pytest.approx(shape.mean_s * 0.5) and call.duration_s >= 0
            assert len(call.result_ids) == shape.num_result_tokens
            assert all(100 <= t < 900 for t in call.result_ids)
    assert len({c.tool for j in jobs for c in j.calls}) > 3


def run(policy: str, rate: float, rps: float, latency: float, seed: int = 0) -> dict:
    return {
        "policy": policy,
        "rate": rate,
        "seed": seed,
        "requests_per_s": rps,
        "normalized_latency_s": latency,
        "output_tokens_per_s": 10 * rps,
        "recompute_share": 0.1,
        "swap_s": 0.0,
        "num_preemptions": 0,
        "num_requests": 10,
        "num_completed": 10,
    }


def test_summary_compares_throughput_within_the_latency_bound_and_without() -> None:
    runs = [
        run("auto", 1, 0.9, 1.0),
        run("auto", 2, 1.8, 1.5),
        run("auto", 4, 2.5, 9.0),
        run("new-request", 1, 0.9, 1.2),
        run("new-request", 2, 1.2, 4.0),
        run("swap", 1, 0.9, 1.1),
        run("swap", 2, 1.5, 1.9),
    ]
    summary = summarize({"runs": runs, "config": {"latency_bound_factor": 2.0}})
    seed = summary["per_seed"][0]
    assert seed["latency_bound_s"] == 2.0  # 2 x the lowest at the lowest rate
    assert seed["requests_per_s_within_bound"] == {"auto": 1.8, "new-request": 0.9, "swap": 1.5}
    assert seed["within_bound"]["auto_vs_new_request"] == pytest.approx(2.0)
    assert seed["within_bound"]["auto_vs_best_fixed"] == pytest.approx(1.2)
    assert seed["within_bound"]["auto_vs_new_request_no_cache"] is None  # not run
    assert seed["unbounded"]["auto_vs_new_request"] == pytest.approx(2.5 / 1.2)
    assert markdown({"runs": runs}).count("\n") == len(runs) + 2


def test_ratios_are_taken_per_seed_and_spread_over_the_seeds() -> None:
    runs = []
    for seed, (auto, base) in enumerate([(1.8, 0.9), (1.5, 1.0), (2.4, 0.8)]):
        runs += [
            run("auto", 1, 0.5, 1.0, seed),
            run("auto", 2, auto, 1.5, seed),
            run("new-request", 1, 0.5, 1.0, seed),
            run("new-request", 2, base, 1.9, seed),
        ]
    ratio = summarize({"runs": runs, "config": {"latency_bound_factor": 2.0}})["ratios"][
        "auto_vs_new_request_within_bound"
    ]
    assert ratio["n"] == 3 and ratio["median"] == pytest.approx(2.0)
    assert ratio["min"] == pytest.approx(1.5) and ratio["max"] == pytest.approx(3.0)
    table = markdown({"runs": runs})
    assert (
        table.count("\n") == 4 + 2 and "| auto | 2 | 3 | 1.900 [1.500, 2.400] |" in table
    )  # mean [min, max]
