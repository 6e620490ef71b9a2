"""Calculator: arithmetic expressions. The tool takes microseconds, so partial execution has
nothing to overlap: the expected gain is near zero, and the benchmark checks for no regression."""

from __future__ import annotations

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.tools.builtin.calculator import CalculatorTool

SYSTEM = "Use the calculator tool for arithmetic, then give the result in one sentence."
TASK = "A warehouse holds 48271 boxes of 9133 screws each, minus 2**20 screws already sold. How many screws are left?"
ANSWER = 48271 * 9133 - 2**20


def _check(results, text: str) -> bool:
    return ok_results(results) and results[-1].content.strip() == str(ANSWER)


def build(options: WorkloadOptions) -> Workload:
    case = Case("calculator", (system(SYSTEM), user(TASK)), ("calculator",), max_tokens=120, check=_check)
    return Workload("calculator", [case], [CalculatorTool()])
