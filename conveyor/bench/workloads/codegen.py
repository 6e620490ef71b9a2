"""CodeGen: the model writes a Python program that does real work (a simulation, data
processing, a matplotlib plot); the `python` tool runs each statement as it arrives."""

from __future__ import annotations

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system, user
from conveyor.tools.builtin.python import PythonTool

SYSTEM = (
    "You can run Python. To do so, write one complete program in a single ```python block, one step per "
    "statement, with no functions and no comments; it is executed and you will see its output. After the "
    "output, state the results in one sentence."
)
TASK = (
    "Using the standard library and matplotlib: import matplotlib with the Agg backend and pyplot; set "
    "random.seed(0); simulate 1,000,000 rolls of two dice and count how often each sum occurs with "
    "collections.Counter; find the prime numbers below 2,000,000 with a sieve of Eratosthenes over a list of "
    "booleans; estimate pi from 1,000,000 random points in the unit square; plot a bar chart of the dice sum "
    "counts and save it to dice.png; finally print the most common sum, the number of primes and the pi "
    "estimate."
)
# One worked exchange in the same style: without it the default model wrote helper functions
# and plotted mismatched arrays (its program raised at the plot in every recorded round).
SHOT_PROGRAM = """```python
import random
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
random.seed(1)
flips = [random.random() < 0.5 for _ in range(200000)]
heads = sum(flips)
squares = sum(i * i for i in range(1000000))
plt.bar(["heads", "tails"], [heads, len(flips) - heads])
plt.savefig("coins.png")
print("heads:", heads)
print("sum of squares:", squares)
```"""
SHOT = (
    {
        "role": "user",
        "content": "Using the standard library and matplotlib: set random.seed(1); flip 200,000 "
        "coins and count the heads; sum the squares of the numbers below 1,000,000; plot "
        "a bar chart of heads and tails and save it to coins.png; print the heads and "
        "the sum.",
    },
    {"role": "assistant", "content": SHOT_PROGRAM},
    {"role": "tool", "content": "heads: 99904\nsum of squares: 333332833333500000"},
    {
        "role": "assistant",
        "content": "Of 200,000 flips 99,904 were heads, and the squares of the numbers below "
        "one million sum to 333,332,833,333,500,000.",
    },
)


def _check(results, text: str) -> bool:
    """The program ran without an error and printed the prime count (148933 below 2 million)."""
    return ok_results(results) and "148933" in results[-1].content


def build(options: WorkloadOptions) -> Workload:
    case = Case(
        "codegen",
        (system(SYSTEM), *SHOT, user(TASK)),
        ("python",),
        call_format="python",
        tool_choice="auto",
        max_tokens=800,
        check=_check,
    )
    return Workload("codegen", [case], [PythonTool()])
