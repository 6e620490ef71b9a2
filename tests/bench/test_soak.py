"""`conveyor bench soak`: a few seconds of it end to end on a tiny random model (in a
subprocess: the soak makes itself a child subreaper, which must not leak into pytest), and
its verdicts, metric parsing and fault tool in-process."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.bench import soak_report, soak_tools
from conveyor.bench.soak import add_soak_flags, end_of_dead_server
from conveyor.bench.soak_load import MIX, Outcome, Outcomes, classify_result, parse_mix
from conveyor.bench.soak_probe import parse_metrics
from conveyor.tools.base import load_spec

ROOT = Path(__file__).resolve().parents[2]
METRICS = """# TYPE conveyor_kv_blocks_used gauge
conveyor_kv_blocks_used 3.0
conveyor_requests_running 1.0
conveyor_requests_awaiting_tools 0.0
conveyor_tool_workers_busy 2.0
conveyor_tool_worker_restarts_total 5.0
conveyor_requests_total{finish_reason="stop"} 4.0
conveyor_requests_created 1.7e9
conveyor_time_to_first_token_seconds_bucket{le="0.1"} 1.0
process_cpu_seconds_total 1.0
"""


def test_a_short_soak_on_a_tiny_model_passes_its_verdicts(tmp_path, tiny_qwen2):
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        "-m",
        "conveyor.cli",
        "bench",
        "soak",
        "--model",
        str(tiny_qwen2),
        "--json",
        str(out),
        "--duration-s",
        "8",
        "--sample-s",
        "0.5",
        "--concurrency",
        "3",
        "--max-tokens",
        "64",
        "256",
        "--abort-share",
        "0.5",
        "--long-prompt-words",
        "400",
        "--call-timeout-s",
        "2",
        "--idle-timeout-s",
        "20",
        "--max-rss-growth-mb",
        "200",
        "--serve-args=--dtype float32 --num-blocks 128 --block-size 4",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["verdicts"] if c["pass"] is False]
    assert not failed and result["pass"] and done.returncode == 0, (failed, done.stderr[-3000:])
    names = {c["name"] for c in result["verdicts"]}
    assert {"KV blocks used at idle", "orphan processes after stop", "HTTP 5xx"} <= names
    assert result["end"]["sample"]["kv_blocks_used"] == 0 and result["orphans"] == []
    assert result["requests"]["outcomes"]["ok"] > 0 and result["requests"]["outcomes"].get("rejected", 0) >= 0
    assert len(result["samples"]) >= 5 and {"rss_mb", "num_fds", "num_descendants"} <= set(
        result["samples"][0]
    )
    assert result["machine"]["cpu_model"] and result["command"].startswith("conveyor bench soak")
    assert "| verdict |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_metrics_keep_every_conveyor_sample_but_buckets_and_timestamps():
    m = parse_metrics(METRICS)
    assert m["conveyor_kv_blocks_used"] == 3 and m['conveyor_requests_total{finish_reason="stop"}'] == 4
    assert m["conveyor_tool_workers_busy"] == 2
    assert not any(k.endswith(("_created", "_bucket")) or k.startswith("process_") for k in m)
    assert not soak_report.is_idle(m)
    assert soak_report.is_idle(
        {**m, "conveyor_kv_blocks_used": 0, "conveyor_requests_running": 0, "conveyor_tool_workers_busy": 0}
    )


def _args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_soak_flags(parser)
    return (
        parser.parse_args([]) if not over else argparse.Namespace(**{**vars(parser.parse_args([])), **over})
    )


def _sample(t: float, rss: float, fds: int = 20, blocks: float = 0.0, busy: float | None = None) -> dict:
    return {
        "t_s": t,
        "rss_mb": rss,
        "num_fds": fds,
        "num_threads": 9,
        "num_descendants": 4,
        "descendants_rss_mb": 90.0,
        "kv_blocks_used": blocks,
        "requests_running": 0.0,
        "requests_awaiting_tools": 0.0,
        "busy_workers": busy,
        "worker_restarts": None,
    }


def _run(samples: list[dict], end: dict, **over) -> dict:
    outcomes = Outcomes()
    outcomes.add(Outcome("server_tool:fault", "ok", "stop", [("fault", "fault:raise injected")]))
    return {
        "samples": samples,
        "end": {"idle": True, "idle_after_s": 0.1, "sample": end, "metrics": {}, "healthy": True},
        "load_s": 10.0,
        "num_sent": 1,
        "clients_stopped": True,
        "outcomes": outcomes.report(),
        "server_alive": True,
        "exit_code": 0,
        "stop_s": 1.0,
        "stop_limit_s": 60.0,
        "orphans": [],
        "log_tail": "",
        "server_log_tracebacks": 0,
        "subreaper": True,
        "started_at": "now",
        "server_command": ["serve"],
        **over,
    }


def _failed(result: dict) -> set[str]:
    return {c["name"] for c in result["verdicts"] if c["pass"] is False}


def test_verdicts_catch_leaked_blocks_growth_orphans_and_5xx():
    flat = [_sample(t, 1000 + (t % 2)) for t in range(40)]
    assert _failed(soak_report.build(_args(), _run(flat, _sample(40, 1000)))) == set()
    growing = [_sample(t, 1000 + 5 * t, fds=20 + t) for t in range(40)]
    result = soak_report.build(
        _args(),
        _run(
            growing, _sample(40, 1200, blocks=2, busy=1), orphans=[{"pid": 1, "cmdline": "x"}], exit_code=None
        ),
    )
    assert _failed(result) == {
        "KV blocks used at idle",
        "busy workers at idle",
        "orphan processes after stop",
        "server exit after SIGTERM",
        "server RSS growth, last quarter - first (MB)",
        "server open FD growth, last quarter - first",
    }
    assert not result["pass"] and result["growth"]["rss_mb"]["slope_per_h"] == pytest.approx(5 * 3600)
    errors = Outcomes()
    errors.add(Outcome("chat", "5xx", detail="HTTP 500"))
    assert "HTTP 5xx" in _failed(
        soak_report.build(_args(), _run(flat, _sample(40, 1000), outcomes=errors.report()))
    )


def test_busy_workers_are_not_judged_on_a_server_without_the_metric():
    result = soak_report.build(_args(), _run([_sample(t, 1000) for t in range(8)], _sample(8, 1000)))
    busy = next(c for c in result["verdicts"] if c["name"] == "busy workers at idle")
    assert busy["pass"] is None and result["pass"]
    assert "n/a" in soak_report.markdown(result)


def test_tool_results_are_classified_by_injected_fault():
    assert classify_result("fault", "fault:large xxxx") == "fault:large"
    assert classify_result("fault", "FaultInjected: fault:raise injected error for 'k'") == "fault:raise"
    assert (
        classify_result("fault", "TimeoutError: the call did not finish within 2 s; its worker was stopped")
        == "fault:timeout"
    )
    died = "RuntimeError: the tool's worker process died (exit code 17)"
    assert classify_result("fault", died) == "fault:worker-died"
    assert classify_result("python", "NameError: name 'x' is not defined") == "python:error"
    assert classify_result("calculator", "391") == "calculator:ok"


@pytest.mark.parametrize("kind", ["ok", "sleep", "raise", "large", "memory"])
def test_the_fault_tool_injects_what_it_draws(monkeypatch, kind):
    monkeypatch.setattr(soak_tools, "SLEEP_S", (0.0, 0.0))
    only = getattr(soak_tools.fault_only, kind)
    if kind == "raise":
        with pytest.raises(soak_tools.FaultInjected, match="fault:raise"):
            only.finish({"key": "k"})
        return
    text = only.finish({"key": "k"})
    assert text.startswith(f"fault:{kind}")
    assert len(text) >= soak_tools.LARGE_CHARS[0] if kind == "large" else len(text) < 200


def test_one_fault_kind_is_the_fault_tool_with_one_weight_and_reaches_the_workers():
    from conveyor.tools import worker_main

    only = load_spec("conveyor.bench.soak_tools:fault_only.large")
    assert only.name == soak_tools.fault.name == "fault"
    assert only.spec() == soak_tools.fault.spec()
    (unpickled,) = pickle.loads(worker_main.pickle_tools([only]))
    assert unpickled.faults == {"large": 1}
    assert soak_tools.fault.faults == soak_tools.FAULTS


def test_the_fault_tool_draws_afresh_in_every_forked_process():
    """The workers' call processes are forked from one that imported the tool: they must not all
    replay its random state (every call of a server drew the same kind)."""
    draws = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child only draws and writes
            os.write(write, "".join(soak_tools.draw(soak_tools.FAULTS)[0] for _ in range(32)).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        draws.append(os.read(read, 64))
        os.close(read)
    assert len(draws[0]) == 32 and draws[0] != draws[1]


def test_the_mix_flag_names_known_kinds_with_weights():
    assert parse_mix("") == MIX
    assert parse_mix("chat=1, server_tool=3") == {"chat": 1, "server_tool": 3}
    for bad in ("chats=1", "chat", "chat=-1", "chat=0"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)


def test_a_mix_without_server_tools_needs_no_tool_results():
    run = _run([_sample(t, 1000) for t in range(8)], _sample(8, 1000), outcomes=Outcomes().report())
    assert "exercised: ok answers and server tool results" in _failed(soak_report.build(_args(), run))
    ok = Outcomes()
    ok.add(Outcome("chat", "ok", "stop"))
    run["outcomes"] = ok.report()
    assert "exercised: ok answers and server tool results" in _failed(soak_report.build(_args(), run))
    assert not _failed(soak_report.build(_args(mix="chat=1"), run))


def test_a_server_that_died_under_load_fails_the_soak():
    samples = [_sample(t, 1000) for t in range(8)]
    run = _run(samples, samples[-1], server_alive=False, exit_code=-9)
    run["end"] = end_of_dead_server(samples[-1])
    failed = _failed(soak_report.build(_args(), run))
    assert {
        "server alive through the load",
        "/health after the load",
        "server idle after the load (s)",
        "server exit after SIGTERM",
    } <= failed
