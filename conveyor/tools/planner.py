"""LLMCompiler plans: each step runs as a call of its tool as soon as its line is complete
and the steps it refers to (`$N`) have results.

A plan arrives as one call named "plan" whose Lines are steps such as `1. search("x")` and
`2. calculator("$1 * 2")`. Step arguments are Python-style literals, positional (in the
order of the tool's schema properties) or by keyword; `$N` (bare, or inside a string) is
replaced by step N's result (a bare `$N` by its JSON value when it is one). `join()` marks the end of a plan and runs nothing. In lazy
mode the steps start at the plan's end, still in dependency order, independent ones in
parallel. The plan's result lists every step's result.
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.tools.base import Call, ToolResult
from conveyor.tools.parsers import parse_step

if TYPE_CHECKING:
    from conveyor.tools.executor import Turn

_REF = re.compile(r"\$\{?(\d+)\}?")
_REF_NAME = re.compile(r"__ref(\d+)__")


@dataclass(slots=True)
class Step:
    number: int
    tool: str
    args_text: str
    deps: tuple[int, ...]
    call: Call | None = None
    result: ToolResult | None = None


class PlanCall:
    """The steps of one plan and their calls (see the module docstring)."""

    name = "plan"

    def __init__(self, turn: Turn, index: int, call_id: str) -> None:
        self.turn = turn
        self.index = index
        self.call_id = call_id
        self.steps: dict[int, Step] = {}
        self.ended = False
        self.early = False
        self.result: ToolResult | None = None
        self.started_at = time.perf_counter()

    # ---- from the turn ----------------------------------------------------------------------
    def on_line(self, text: str, early: bool) -> None:
        """A complete plan line; in partial mode (`early`) its step may start now."""
        self.early = early
        parsed = parse_step(text)
        if parsed is None or parsed.step in self.steps:
            return
        self.steps[parsed.step] = Step(parsed.step, parsed.tool, parsed.args, parsed.deps)
        if early:
            self._run_ready()

    def on_end(self) -> None:
        """The plan is complete: every step may start once its dependencies are done."""
        self.ended = True
        self._run_ready()
        self._maybe_done()

    def on_turn_end(self, clean: bool) -> None:
        """Steps of tools with external side effects start only now, and only if clean."""
        if not clean:
            self.cancel()
            return
        self._run_ready(allow_external=True)
        self._maybe_done()

    def cancel(self) -> None:
        for step in self.steps.values():
            if step.result is None and step.call is not None:
                self.turn.cancel_call(step.call, "aborted")
                step.result = step.call.result
        if self.result is None:
            self.result = self._error("the plan was cut off before it ended")

    def on_result(self, result: ToolResult) -> None:
        """A step's worker result."""
        for step in self.steps.values():
            if step.call is not None and step.call.call_id == result.call_id:
                step.call.result = step.result = result
        self._run_ready(allow_external=self.turn.ended and self.turn.clean)
        self._maybe_done()

    # ---- running steps ----------------------------------------------------------------------
    def _run_ready(self, allow_external: bool = False) -> None:
        for step in self.steps.values():
            if step.call is not None or step.result is not None:
                continue
            if step.tool == "join":
                step.result = ToolResult(
                    f"{self.call_id}.s{step.number}", "join", "", done_at=time.perf_counter()
                )
                continue
            failed = [d for d in step.deps if d not in self.steps or self._failed(d)]
            if failed and (self.ended or any(d in self.steps for d in failed)):
                step.result = self._error(
                    f"step {step.number} depends on step(s) {failed}, which failed or do not exist"
                )
            elif all(self._done(d) for d in step.deps):
                self._start(step, allow_external)

    def _start(self, step: Step, allow_external: bool) -> None:
        call_id = f"{self.call_id}.s{step.number}"
        tool = self.turn.allowed.get(step.tool)
        call = Call(step.number, call_id, step.tool, tool, ended=True)
        if tool is None:
            step.result = self._error(f"step {step.number}: unknown tool {step.tool!r}")
            return
        if tool.side_effects == "external" and not allow_external:
            return  # waits for the turn to end cleanly
        try:
            args = step_args(tool.parameters, step.args_text, self._contents())
        except ValueError as e:
            step.result = self._error(f"step {step.number}: {e}")
            return
        error = self.turn.check_args(call, args)
        if error:
            step.result = self._error(f"step {step.number}: {error}")
            return
        step.call = call
        self.turn.run_complete(call, owner=self)

    def _done(self, number: int) -> bool:
        step = self.steps.get(number)
        return step is not None and step.result is not None and not step.result.is_error

    def _failed(self, number: int) -> bool:
        step = self.steps[number]
        return step.result is not None and step.result.is_error

    def _contents(self) -> dict[int, str]:
        return {n: s.result.content for n, s in self.steps.items() if s.result is not None}

    def _maybe_done(self) -> None:
        """The plan's result, once it has ended and every step has one."""
        if self.result is not None or not self.ended:
            return
        if not self.steps:
            self.result = self._error("the plan has no steps")
        elif all(s.result is not None for s in self.steps.values()):
            steps = self.steps.values()
            content = "\n".join(f"${s.number} = {s.result.content}" for s in steps if s.tool != "join")
            self.result = ToolResult(
                self.call_id,
                "plan",
                content,
                is_error=any(s.result.is_error for s in steps),
                started_at=self.started_at,
                done_at=time.perf_counter(),
            )

    def _error(self, message: str) -> ToolResult:
        now = time.perf_counter()
        return ToolResult(
            self.call_id, "plan", f"Error: {message}", is_error=True, started_at=now, done_at=now
        )


def step_args(schema: dict[str, Any], args_text: str, results: dict[int, str]) -> dict[str, Any]:
    """Arguments of a step from its Python-style argument text, `$N` replaced by results."""
    source = _REF.sub(lambda m: f"__ref{m.group(1)}__", args_text)
    try:
        call = ast.parse(f"f({source})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse the arguments {args_text!r}: {e.msg}") from None
    names = list(schema.get("properties", {}))
    if len(call.args) > len(names):
        raise ValueError(f"{len(call.args)} positional arguments for {len(names)} parameters")
    args = {names[i]: _value(a, results) for i, a in enumerate(call.args)}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs are not supported in plan steps")
        args[kw.arg] = _value(kw.value, results)
    return args


def _value(node: ast.AST, results: dict[int, str]) -> Any:
    if isinstance(node, ast.Name) and _REF_NAME.fullmatch(node.id):  # a bare $N: its JSON value if it has one
        content = _ref(int(_REF_NAME.fullmatch(node.id).group(1)), results)
        try:
            return json.loads(content)
        except ValueError:
            return content
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _REF_NAME.sub(lambda m: _ref(int(m.group(1)), results), node.value)
    if isinstance(node, ast.List | ast.Tuple):
        return [_value(e, results) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"not a literal: {ast.unparse(node)!r}") from None


def _ref(number: int, results: dict[int, str]) -> str:
    if number not in results:
        raise ValueError(f"${number} has no result")
    return results[number]
