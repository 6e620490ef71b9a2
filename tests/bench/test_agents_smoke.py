"""`conveyor bench agents` end to end on a tiny random model: replay servers under two schedules
and without the prefix cache, one BFCL program and a short coding program through the openai
client, the JSON, table and plots written; every turn's calls come back as scripted."""

from __future__ import annotations

import argparse
import json

import pytest

from conveyor.bench.agents import add_agents_flags, run_agents_bench
from conveyor.bench.agents_client import gbnf_literal
from tests.tiny import build_tiny_model

pytest.importorskip("bfcl_eval", reason="the bench extra (bfcl-eval) is not installed")


def test_agents_bench_runs_and_reports(tmp_path) -> None:
    model = build_tiny_model(tmp_path / "m", "qwen2")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    parser = argparse.ArgumentParser()
    add_agents_flags(parser)
    args = parser.parse_args(
        [
            *("--json", str(tmp_path / "agents.json"), "--model", str(model)),
            *("--systems", "today", "las", "no-cache", "--rates", "2", "--repeats", "1"),
            *("--num-bfcl", "1", "--bfcl-called-tools-only", "--num-coding", "1"),
            *("--coding-turns", "3", "--coding-growth", "20", "--tool-median-s", "0.01"),
            *("--kv-cache-mb", "16", "--max-model-len", "4096", "--num-threads", "1", "--timeout-s", "120"),
        ]
    )
    result = run_agents_bench(args)
    runs = result["runs"]
    assert [r["system"] for r in runs] == ["today", "las", "no-cache"]
    for run in runs:
        assert [p["error"] for p in run["programs"]] == ["", ""]
        assert all(t["calls_match"] for p in run["programs"] for t in p["turns"])
        assert sum(len(p["turns"]) for p in run["programs"]) == sum(
            c["requests"] for c in result["config"]["programs"]
        )
    cached = {r["system"]: sum(t["cached_tokens"] for p in r["programs"] for t in p["turns"]) for r in runs}
    assert cached["no-cache"] == 0 and cached["today"] > 0
    assert any("conveyor_kv_blocks_used" in s for s in runs[0]["kv_samples"])
    for suffix in (".md", "_kv.png", "_jct.png"):
        assert (tmp_path / f"agents{suffix}").stat().st_size > 0
    assert "| las |" in (tmp_path / "agents.md").read_text()


def test_gbnf_literal_escapes() -> None:
    assert gbnf_literal('a "b"\n\\') == 'root ::= "a \\"b\\"\\n\\\\"'
