"""What a workload is: cases (prompt, tools offered, call format, a correctness check) and the
tool objects the engine must serve for them. Plain data; the runner drives them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools.base import ToolResult

Check = Callable[[list[ToolResult], str], bool]


@dataclass(frozen=True, slots=True)
class Case:
    """One request of a workload. `check(results, text)`: the run's tool results and final
    answer were right. `rejects`: the case is meant to have its first call rejected."""

    name: str
    messages: tuple[dict[str, str], ...]
    tools: tuple[str, ...]
    call_format: str = "hermes"
    tool_choice: str | dict = "required"
    max_tokens: int = 400
    check: Check = field(default=lambda results, text: bool(results) and not results[0].is_error)
    rejects: bool = False
    max_tool_rounds: int | None = None  # None: the engine's default


@dataclass(frozen=True, slots=True)
class WorkloadOptions:
    """Knobs shared by the workloads."""

    search_latency_ms: float = 100.0  # injected round trip of each search-service request
    corpus_limit: int = 0  # 0: every stdlib docstring; tests use a few hundred


@dataclass(slots=True)
class Workload:
    """A workload's cases, the tools it serves, and what to stop when it is done."""

    name: str
    cases: list[Case]
    tools: list[Any]
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def ok_results(results: list[ToolResult]) -> bool:
    """At least one call, and the last one succeeded."""
    return bool(results) and not results[-1].is_error


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}
