"""`conveyor bench engine` on a tiny model: both transformers dtypes measured, the faster is the
baseline, repeats give a spread, and the JSON records the command, the CPU and each path chosen."""

from __future__ import annotations

import json

from conveyor.cli import main
from conveyor.engine.model.linear import BUCKETS


def test_engine_bench_records_baseline_spread_paths_and_command(tiny_llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("conveyor.bench.engine_bench.memory_bandwidth_gb_s", lambda: 10.0)  # skip 1 GiB reads
    out = tmp_path / "engine.json"
    argv = [
        "bench",
        "engine",
        "--model",
        str(tiny_llama),
        "--concurrency",
        "1",
        "2",
        "--new-tokens",
        "4",
        "--warmup-tokens",
        "2",
        "--repeats",
        "2",
        "--prefill-tokens",
        "16",
        "--profile",
        "1",
        "--num-blocks",
        "64",
        "--json",
        str(out),
    ]
    monkeypatch.setattr("sys.argv", ["conveyor", *argv])
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("conveyor bench engine --model ")
    assert set(result["hf_tok_s"]) == {"bfloat16", "float32"}
    for row in result["rows"]:
        c = str(row["concurrency"])
        ours = result["conveyor_tok_s"][c]
        assert len(ours["runs"]) == 2 and ours["min"] <= ours["median"] <= ours["max"]
        hf = {d: rates[c]["median"] for d, rates in result["hf_tok_s"].items()}
        assert row["hf_tok_s"] == max(hf.values()) and row["hf_best_dtype"] == max(hf, key=hf.get)
        assert row["ratio"] == ours["median"] / row["hf_tok_s"]
    assert (
        result["c1_share_of_ceiling"]
        == result["conveyor_tok_s"]["1"]["median"] / result["bandwidth_ceiling_tok_s"]
    )
    assert result["linear_choices"] and all(
        set(b) == {label for label, _ in BUCKETS} for b in result["linear_choices"].values()
    )
    assert result["cpu"] and result["memory_bandwidth_gb_s"] == {"before": 10.0, "after": 10.0}
