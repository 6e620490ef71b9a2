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
    assert len(jobs) == 40 and make_jobs(2.0, args, vocab=1000, seed=1) == jobs   # seeded
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


def run(policy: str, rate: float, rps: float, latency: float) -> dict:
    return {"policy": policy, "rate": rate, "requests_per_s": rps, "normalized_latency_s": latency,
            "output_tokens_per_s": 10 * rps, "recompute_share": 0.1, "swap_s": 0.0, "num_preemptions": 0}


def test_summary_compares_throughput_within_the_latency_bound() -> None:
    runs = [run("auto", 1, 0.9, 1.0), run("auto", 2, 1.8, 1.5), run("auto", 4, 2.5, 9.0),
            run("new-request", 1, 0.9, 1.2), run("new-request", 2, 1.2, 4.0),
            run("swap", 1, 0.9, 1.1), run("swap", 2, 1.5, 1.9)]
    summary = summarize({"runs": runs, "config": {"latency_bound_factor": 2.0}})
    assert summary["latency_bound_s"] == 2.0                       # 2 x the lowest at the lowest rate
    assert summary["requests_per_s_within_bound"] == {"auto": 1.8, "new-request": 0.9, "swap": 1.5}
    assert summary["auto_vs_new_request"] == pytest.approx(2.0)
    assert summary["auto_vs_best_fixed"] == pytest.approx(1.2)
    assert markdown({"runs": runs}).count("\n") == len(runs) + 2
