"""The agents benchmark's arithmetic on hand-made records: JCT percentiles, goodput within the
bound, follow-up TTFT, prefilled tokens, the cached share of repeated prefixes, ratios to the
baseline; arrivals and tool latencies repeat across systems; BFCL calls parse as scripted."""

from __future__ import annotations

import json
import math

import pytest

from conveyor.bench.agents_client import LoadSpec, arrivals, tool_delays
from conveyor.bench.agents_programs import coding_program
from conveyor.bench.agents_report import run_metrics, summarize


def turn(index: int, prompt: int, cached: int, repeated: int, ttft: float = 0.1) -> dict:
    return {
        "index": index,
        "ttft_s": ttft,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": 10,
        "repeated_tokens": repeated,
        "calls_match": True,
    }


def run(system: str, jcts: list[float], wall_s: float = 100.0, error: str = "") -> dict:
    turns = [turn(0, 100, 0, 0), turn(1, 150, 96, 110, ttft=0.5)]
    programs = [{"jct_s": j, "error": "", "turns": turns} for j in jcts]
    if error:  # a program cut short: no JCT
        programs.append({"jct_s": math.nan, "error": error, "turns": []})
    return {"system": system, "rate": 0.1, "repeat": 0, "wall_s": wall_s, "programs": programs}


def test_run_metrics() -> None:
    m = run_metrics(run("a", [10.0, 20.0, 30.0, 40.0, 50.0], error="cut"), bound_s=35.0)
    assert m["jct_p50_s"] == 30.0 and m["jct_p90_s"] == 50.0
    assert m["goodput"] == pytest.approx(3 / 100)  # three within 35 s, over the wall time
    assert m["completed"] == pytest.approx(5 / 6)
    assert m["follow_up_ttft_p50_s"] == 0.5
    assert m["prefilled_per_request"] == pytest.approx((100 + 54) / 2)
    assert m["repeated_prefix_cached"] == pytest.approx(96 / 110)


def test_summary_ratios_against_the_baseline() -> None:
    table = summarize([run("base", [10.0, 20.0]), run("new", [5.0, 10.0])], "base", bound_s=15.0)
    cell = table["new"]["0.1"]
    assert cell["jct_p90_s"]["median"] == 10.0
    assert cell["jct_p90_s_vs_base"]["median"] == pytest.approx(0.5)
    assert cell["goodput_vs_base"]["median"] == pytest.approx(2.0)  # both within 15 s against one


def test_arrivals_and_tool_latencies_are_the_same_for_every_system() -> None:
    spec = LoadSpec(rate=0.5, tool_median_s=1.0, seed=3)
    assert arrivals(5, 0.5, 3) == arrivals(5, 0.5, 3) and arrivals(5, 0.5, 3)[0] == 0.0
    program = coding_program("c", num_turns=4, growth_tokens=10)
    delays = tool_delays(program, spec)
    assert delays == tool_delays(program, spec) and all(d > 0 for d in delays)


def test_coding_program_grows_and_scripts_its_calls() -> None:
    program = coding_program("c", num_turns=31, growth_tokens=200)
    turns = program.episodes[0].turns
    assert program.num_requests == 32 and turns[-1].calls == ()
    assert all(len(t.results[0]) >= 200 * 3.5 for t in turns[:-1])
    name, arguments = turns[0].calls[0]
    assert json.loads(turns[0].text.split("\n")[1]) == {"name": name, "arguments": json.loads(arguments)}


def test_bfcl_programs_replay_the_ground_truth() -> None:
    pytest.importorskip("bfcl_eval", reason="the bench extra (bfcl-eval) is not installed")
    from conveyor.bench.agents_programs import bfcl_programs

    [program] = bfcl_programs(1, only_called_tools=True)
    first = program.episodes[0].turns[0]
    assert first.calls == (("cd", json.dumps({"folder": "document"})),)
    assert first.results == (json.dumps({"current_working_directory": "document"}),)
    assert {t["function"]["name"] for t in program.tools} == {"cd", "mkdir", "mv", "grep", "sort", "diff"}
    assert all(e.turns[-1].calls == () for e in program.episodes)


def test_quick_keeps_the_flags_given() -> None:
    import argparse

    from conveyor.bench.agents import QUICK, add_agents_flags, apply_quick

    parser = argparse.ArgumentParser()
    add_agents_flags(parser)
    args = parser.parse_args(["--quick", "--systems", "today", "las"])
    apply_quick(args)
    assert (
        args.systems == ["today", "las"]
        and args.rates == QUICK["rates"]
        and args.num_bfcl == QUICK["num_bfcl"]
    )
