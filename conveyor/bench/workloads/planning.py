"""Planning: LLMCompiler-style plans (`1. search("...")` ... `join()` `<END_OF_PLAN>`) over the
search service; each step runs as soon as its line and the steps it refers to (`$N`) are done."""

from __future__ import annotations

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, ok_results, system
from conveyor.bench.workloads.search import PAGE_CHARS, start_service
from conveyor.tools.builtin.calculator import CalculatorTool
from conveyor.tools.builtin.http import SearchTool

SYSTEM = """You make plans that answer questions about the Python standard library. Tools:
- search(query: str, k: int): search the documentation; returns the best k pages.
- calculator(expression: str): evaluate arithmetic; may use the result of a step as $N.
Write a numbered plan, one tool call per line, then `join()` and <END_OF_PLAN>. Do not answer yet.

Example.
Question: How do I compress bytes with zlib and how do I read a gzip file?
Plan:
1. search("zlib compress bytes", 2)
2. search("gzip open read file", 2)
3. join()
<END_OF_PLAN>

After the results come back, answer in two sentences."""
TASK = (
    "Question: How do I parse command-line options, how do I read a CSV file, and how do I copy a file "
    "with its metadata?\nPlan:"
)


def _check(results, text: str) -> bool:
    """Every step ran, and pages of the csv and shutil modules were found."""
    content = results[0].content if results else ""
    return ok_results(results[:1]) and all(name in content for name in ('"csv', '"shutil'))


def build(options: WorkloadOptions) -> Workload:
    url, stop = start_service(options)
    case = Case(
        "planning",
        (system(SYSTEM), {"role": "user", "content": TASK}),
        ("search", "calculator"),
        call_format="plan",
        tool_choice="auto",
        max_tokens=300,
        check=_check,
        max_tool_rounds=1,
    )
    tools = [SearchTool(url, fetch_chars=PAGE_CHARS), CalculatorTool()]
    return Workload("planning", [case], tools, [stop])
