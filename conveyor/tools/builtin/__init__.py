"""Built-in tools, by the name they are served under (`--tools python sqlite ...`)."""

from __future__ import annotations

BUILTIN_TOOLS: dict[str, str] = {
    "python": "conveyor.tools.builtin.python:PythonTool",
    "sqlite": "conveyor.tools.builtin.sqlite:SQLiteTool",
    "calculator": "conveyor.tools.builtin.calculator:CalculatorTool",
    "http_get": "conveyor.tools.builtin.http:HttpGetTool",
    "search": "conveyor.tools.builtin.http:SearchTool",
    "validate": "conveyor.tools.builtin.validate:ValidateTool",
}
