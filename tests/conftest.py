"""Shared fixtures: tiny random-weight models (Llama and Qwen2 shapes) with a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


# The test tiers, by file (one table, so test modules carry no tier of their own):
# `pytest -m "not slow and not e2e"` is the quick tier; plain `pytest` runs everything.
E2E = ("tests/e2e/", "tests/backends/test_remote_llamacpp.py")  # the real SmolLM2 (and llama.cpp)
SLOW = (
    "tests/bench/test_agents_smoke.py",
    "tests/bench/test_engine_bench.py",
    "tests/bench/test_soak.py",
    "tests/bench/test_workloads_smoke.py",
    "tests/server/test_schemathesis.py",
    "tests/server/test_hostile_code_http.py",
    "tests/unit/test_sandbox_hostile.py",
    # against transformers, every kernel built and timed, engines with tool workers, grammars compiled
    "tests/engine/test_exactness.py",
    "tests/engine/test_penalties.py",
    "tests/engine/test_linear.py",
    "tests/engine/test_tools.py",
    "tests/engine/test_constrained.py",
    "tests/engine/test_swap.py",
    "tests/engine/test_quant_kernels.py",
    "tests/engine/test_gguf_native.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(config.rootpath)
    missing = [entry for entry in (*E2E, *SLOW) if not (root / entry).exists()]
    assert not missing, f"the test tiers name files that are not there: {missing}"
    for item in items:
        path = Path(item.path).relative_to(root).as_posix()
        if path.startswith(E2E):
            item.add_marker(pytest.mark.e2e)
        if path.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
