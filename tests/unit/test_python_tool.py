"""PythonTool in-process (no worker): REPL semantics, output capture, errors, call forms."""

from __future__ import annotations

import pickle

import pytest

from conveyor.tools.base import ToolRegistry
from conveyor.tools.builtin.python import PythonError, PythonTool


def run_lines(*lines: str) -> str:
    tool = PythonTool().for_call()
    for line in lines:
        tool.on_line(line)
    return tool.finish({"code": "\n".join(lines)})


def error_of(*lines: str) -> str:
    with pytest.raises(PythonError) as info:
        run_lines(*lines)
    return str(info.value)


def test_output_and_last_expression() -> None:
    assert run_lines("x = 20", "print('x is', x)", "x + 22") == "x is 20\n42"
    assert run_lines("[1, 'a']") == "[1, 'a']"
    assert run_lines("'text'") == "'text'"  # repr, as a REPL shows it


def test_only_a_final_non_none_expression_is_shown() -> None:
    assert run_lines("1 + 1", "y = 3") == "(no output)"
    assert run_lines("print('printed')") == "printed\n"  # print() returns None
    assert run_lines("None") == "(no output)"


def test_multi_line_statements() -> None:
    lines = (
        "def double(v):\n    return v * 2",
        "for i in range(3):\n    print(double(i))",
        "if False:\n    pass\nelse:\n    print('else')",
        "class A:\n    n = 5",
        "A.n",
    )
    assert run_lines(*lines) == "0\n2\n4\nelse\n5"


def test_a_line_may_hold_several_statements() -> None:
    assert run_lines("a = 1; b = 2", "a + b") == "3"


def test_stderr_is_captured_and_main_is_main() -> None:
    assert run_lines("import sys", "print('err', file=sys.stderr)", "__name__") == "err\n'__main__'"


def test_an_exception_stops_later_statements() -> None:
    text = error_of("print('before')", "def f(v):\n    return v / 0", "f(1)", "print('after')")
    assert text.startswith("execution stopped at an exception")
    assert "before" in text and "after" not in text
    assert "ZeroDivisionError: division by zero" in text
    assert 'File "<python>", line 3, in f' in text and "return v / 0" in text  # lines of the whole cell
    assert "python.py" not in text  # no frames of the tool


def test_syntax_error() -> None:
    text = error_of("x = 1", "y = (")
    assert "SyntaxError" in text and "line 2" in text


def test_sys_exit() -> None:
    assert run_lines("print('a')", "import sys; sys.exit()", "print('b')") == "a\n"
    assert "SystemExit: 3" in error_of("import sys; sys.exit(3)")


def test_json_call_form_runs_statement_by_statement() -> None:
    tool = PythonTool().for_call()
    code = "print(1)\nz = 2\nz * 3"
    tool.on_field("code", code)
    assert tool.finish({"code": code}) == "1\n6"


def test_finish_runs_the_code_only_if_nothing_ran() -> None:
    tool = PythonTool().for_call()
    assert tool.finish({"code": "print('once')"}) == "once\n"
    tool = PythonTool().for_call()
    tool.on_line("print('once')")
    assert tool.finish({"code": "print('once')"}) == "once\n"  # not run a second time


def test_each_call_has_a_fresh_namespace() -> None:
    registered = PythonTool()
    first = registered.for_call()
    first.on_line("secret = 1")
    first.finish({})
    with pytest.raises(PythonError, match="NameError: name 'secret' is not defined"):
        registered.for_call().finish({"code": "secret"})


def test_cancel_drops_the_state() -> None:
    tool = PythonTool().for_call()
    tool.on_line("print('dropped')")
    tool.cancel()
    assert tool.finish({"code": "1"}) == "1"


def test_tool_description_and_pickling() -> None:
    registry = ToolRegistry(["python"])
    tool = registry.get("python")
    assert isinstance(tool, PythonTool) and tool.side_effects == "none" and tool.body_field == "code"
    assert registry.specs()[0]["function"]["parameters"]["required"] == ["code"]
    assert isinstance(pickle.loads(pickle.dumps(tool)), PythonTool)
