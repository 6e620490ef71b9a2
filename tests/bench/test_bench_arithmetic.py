"""The arithmetic behind committed ratios: loadgen.summarize, serve._ratios, compare.pair_savings,
and the provenance every results file records."""

from __future__ import annotations

import sys

import pytest

from conveyor.bench.loadgen import Sample, summarize
from conveyor.bench.results import command_line, provenance
from conveyor.bench.serve import _ratios
from conveyor.bench.workloads.compare import compare, pair_savings


def test_summarize_counts_only_answered_requests_and_takes_nearest_rank_percentiles():
    samples = [
        Sample(ttft_s=0.1 * (i + 1), itl_s=[0.01, 0.03], num_output_tokens=10, ok=True) for i in range(10)
    ]
    samples.append(Sample())  # failed: no token came back
    row = summarize(samples, wall_s=4.0)
    assert (row["num_requests"], row["num_ok"], row["output_tokens"]) == (11, 10, 100)
    assert row["output_tokens_per_s"] == 25.0
    assert row["ttft_s"] == {"p50": 0.6, "p90": 1.0, "p99": 1.0}  # sorted[int(q * n)]
    assert row["itl_s"]["p50"] == 0.03 and row["itl_s"]["p90"] == 0.03
    assert summarize([], 0.0)["output_tokens_per_s"] == 0.0 and summarize([], 0.0)["ttft_s"]["p50"] == 0.0


def _row(rate: float, repeat: int, tokens_per_s: float, ttft: float) -> dict:
    return {"rate": rate, "repeat": repeat, "output_tokens_per_s": tokens_per_s, "ttft_s": {"p50": ttft}}


def test_serve_ratios_pair_runs_by_rate_and_repeat_and_spread_over_repeats():
    ours = {
        "rates": [_row(1, 0, 12.0, 0.2), _row(1, 1, 10.0, 0.3), _row(1, 2, 11.0, 0.1), _row(2, 0, 20.0, 0.5)]
    }
    peer = {
        "rates": [_row(1, 1, 10.0, 0.6), _row(1, 0, 10.0, 0.4), _row(1, 2, 10.0, 0.2), _row(2, 0, 0.0, 0.0)]
    }
    ratios = _ratios(ours, peer)
    assert ratios["ratio_output_tokens_per_s"]["1"] == {"median": 1.1, "min": 1.0, "max": 1.2, "n": 3}
    assert ratios["ratio_ttft_p50"]["1"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    assert ratios["ratio_output_tokens_per_s"]["2"] is None  # the peer produced nothing: no ratio
    assert _ratios(ours, None) == {"ratio_output_tokens_per_s": None, "ratio_ttft_p50": None}


def _details(*pairs: tuple[str, float, str, float]) -> list[dict]:
    return [
        {"mode": m, "latency_s": s, "ideal_saving_s": 0.5}
        for a, b, c, d in pairs
        for m, s in ((a, b), (c, d))
    ]


def test_pair_savings_takes_each_pair_in_either_order():
    row = {
        "round_details": _details(
            ("lazy", 10.0, "partial", 8.0), ("partial", 9.0, "lazy", 10.5), ("lazy", 10.0, "partial", 10.2)
        )
    }
    assert pair_savings(row) == pytest.approx([2.0, 1.5, -0.2])


def test_compare_keeps_the_share_and_the_seconds_of_the_baseline():
    run = {
        "workloads": {
            "search": {
                "reduction": 0.05,
                "round_details": _details(("lazy", 10.0, "partial", 9.5)),
                "ideal_reduction": 0.05,
                "lazy_s": 10.0,
            }
        }
    }
    base = {
        "workloads": {
            "search": {
                "reduction": 0.10,
                "round_details": _details(("lazy", 5.0, "partial", 4.5)),
                "ideal_reduction": 0.1,
                "lazy_s": 5.0,
            }
        }
    }
    row = compare(run, base)["search"]
    assert row["kept_share"] == pytest.approx(0.5) and row["kept_seconds"] == pytest.approx(1.0)


def test_results_record_the_command_line_and_the_machine(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["/venv/bin/conveyor", "bench", "intercept", "--rates", "1", "2", "--json", "a b.json"]
    )
    assert command_line() == "conveyor bench intercept --rates 1 2 --json 'a b.json'"
    monkeypatch.setattr(sys, "argv", ["/src/conveyor/cli.py", "bench", "serve"])
    assert command_line() == "conveyor bench serve"
    record = provenance()
    assert record["command"] == "conveyor bench serve" and record["machine"]["cpu_model"]
    assert len(record["loadavg_at_end"]) == 3
