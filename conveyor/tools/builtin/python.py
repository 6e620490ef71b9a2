"""The python tool: a notebook cell whose statements run as soon as each is complete.

A call arrives as a ```python fence (one `on_line` per complete top-level statement) or as a
JSON call {"code": ...} (`on_field`, which runs the code statement by statement the same
way). Statements run in order in one namespace per call (`__name__ == "__main__"`); their
stdout and stderr are captured. When the last statement is a bare expression, the repr of
its value (if not None) follows the output, as in a REPL. The first exception stops the
cell: later statements are not run, and `finish` raises `PythonError` carrying the output so
far and the traceback's last lines, so the call's result is an error (`is_error=True`) that
the model can read. `finish` runs `args["code"]` only when no line or field ran before.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import io
import linecache
import traceback
from pathlib import Path
from typing import Any

from conveyor.tools.base import Tool

FILENAME = "<python>"
TRACEBACK_LINES = 20
_MACHINERY = str(Path(__file__).resolve().parents[1])  # conveyor/tools


class PythonError(Exception):
    """The code raised an exception; the message holds its output and traceback."""


class _Cell:
    """One call's interpreter: namespace, captured output, and the source run so far."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.output = io.StringIO()
        self.last_value: str | None = None  # repr of the last statement, if a non-None expression
        self.error: str | None = None  # traceback of the exception that stopped the cell
        self.stopped = False  # an exception or sys.exit(): run nothing more
        self.ran = False
        self.lines: list[str] = []  # the source run so far, for tracebacks

    def run(self, source: str) -> None:
        """Run the statements of `source` in order, unless an earlier one stopped the cell."""
        self.ran = True
        if self.stopped:
            return
        offset = len(self.lines)
        self.lines.extend(f"{line}\n" for line in source.splitlines())
        linecache.cache[FILENAME] = (0, None, self.lines, FILENAME)
        try:
            tree = ast.parse(source, FILENAME)
        except SyntaxError as e:
            e.lineno = (e.lineno or 1) + offset
            self._stop(e)
            return
        ast.increment_lineno(tree, offset)
        for node in tree.body:
            try:
                self._run_statement(node)
            except SystemExit as e:
                self.stopped = True
                if e.code not in (None, 0):
                    self.error = f"SystemExit: {e.code}"
                return
            except BaseException as e:  # noqa: BLE001 - the cell's error, shown to the model
                self._stop(e)
                return

    def _run_statement(self, node: ast.stmt) -> None:
        with contextlib.redirect_stdout(self.output), contextlib.redirect_stderr(self.output):
            if isinstance(node, ast.Expr):
                code = compile(ast.Expression(node.value), FILENAME, "eval")
                value = eval(code, self.namespace)
                self.last_value = None if value is None else repr(value)
            else:
                exec(compile(ast.Module([node], type_ignores=[]), FILENAME, "exec"), self.namespace)  # noqa: S102 - running the model's code is the job
                self.last_value = None

    def _stop(self, e: BaseException) -> None:
        """Keep the traceback of `e`, less the frames of the tool machinery (this file, the
        worker's sandbox hooks)."""
        report = traceback.TracebackException(type(e), e, e.__traceback__)
        report.stack = traceback.StackSummary.from_list(
            [f for f in report.stack if not f.filename.startswith(_MACHINERY)]
        )
        lines = "".join(report.format()).splitlines()
        self.error = "\n".join(lines[-TRACEBACK_LINES:])
        self.stopped = True

    def result(self) -> str:
        """The cell's output and last value; raises PythonError if an exception stopped it."""
        text = self.output.getvalue()
        if self.error is not None:
            raise PythonError(
                "execution stopped at an exception (later statements were not run)\n"
                + _join(text, self.error)
            )
        return _join(text, self.last_value or "") or "(no output)"


def _join(first: str, second: str) -> str:
    if first and second and not first.endswith("\n"):
        first += "\n"
    return first + second


class PythonTool(Tool):
    """Runs Python code statement by statement, as the model writes it."""

    name = "python"
    description = (
        "Run Python code and return what it prints, plus the value of the last line if it is an "
        "expression (as in a notebook cell). Each top-level statement runs as soon as it is "
        "written, in a fresh namespace per call; an exception stops the code and returns its "
        "traceback. The working directory is a private temporary folder (files elsewhere cannot "
        "be written); CPU time, memory and file sizes are limited."
    )
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "the Python code to run"}},
        "required": ["code"],
        "additionalProperties": False,
    }
    side_effects = "none"  # its effects stay inside its worker and temp dir: it may run early
    body_field = "code"
    requires_isolation = True  # the model's code: never without the whole sandbox (docs/security.md)

    def __init__(self) -> None:
        self._cell_state: _Cell | None = None

    def for_call(self) -> PythonTool:
        fresh = copy.copy(self)
        fresh._cell_state = None
        return fresh

    @property
    def _cell(self) -> _Cell:
        if self._cell_state is None:
            self._cell_state = _Cell()
        return self._cell_state

    def on_line(self, line: str) -> None:
        self._cell.run(line)

    def on_field(self, key: str, value: Any) -> None:
        if key == self.body_field:
            self._cell.run(str(value))

    def finish(self, args: dict[str, Any]) -> str:
        cell = self._cell
        if not cell.ran:
            cell.run(str(args.get(self.body_field, "")))
        return cell.result()

    def cancel(self) -> None:
        self._cell_state = None
