"""CodeGen: the model writes a Python program that does real work (a simulation, data
processing, a matplotlib plot); the `python` tool runs each statement as it arrives."""
from __future__ import annotations

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.tools.builtin.python import PythonTool

SYSTEM = ("You can run Python. To do so, write one complete program in a single ```python block, one step per "
          "statement, with no functions and no comments; it is executed and you will see its output. After the "
          "output, state the results in one sentence.")
TASK = ("Using the standard library and matplotlib: import matplotlib with the Agg backend and pyplot; set "
        "random.seed(0); simulate 300,000 rolls of two dice and count how often each sum occurs; find the prime "
        "numbers below 1,500,000 with a sieve; estimate pi from 800,000 random points; plot a bar chart of the "
        "dice sums and save it to dice.png; finally print the most common sum, the number of primes and the pi "
        "estimate.")


def _check(results, text: str) -> bool:
    """The program ran without an error and printed the prime count (114155 below 1.5 million)."""
    return ok_results(results) and "114155" in results[-1].content


def build(options: WorkloadOptions) -> Workload:
    case = Case("codegen", (system(SYSTEM), user(TASK)), ("python",), call_format="python",
                tool_choice="auto", max_tokens=500, check=_check)
    return Workload("codegen", [case], [PythonTool()])
