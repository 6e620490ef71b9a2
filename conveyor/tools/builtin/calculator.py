"""The `calculator` tool: safe arithmetic, evaluated the moment the expression completes.

The expression is parsed with `ast` and walked by hand: numbers, `+ - * / // % **`, unary
`+ -`, parentheses, the constants `pi`, `e`, `tau`, `inf` and a few functions (`sqrt`,
`log`, `log10`, `exp`, `sin`, `cos`, `tan`, `floor`, `ceil`, `abs`, `round`, `min`,
`max`). Nothing is ever `eval`-ed: names, attributes, strings and any other call are
errors. Integers are capped at `MAX_INT_BITS` (a power is checked before it is computed,
so `9**9**9` is an error at once rather than a CPU bomb), expressions at `MAX_CHARS`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from conveyor.tools.base import Tool

Number = int | float
MAX_CHARS = 2000
MAX_INT_BITS = 4096
MAX_ROUND_DIGITS = 100

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
}


class CalculatorError(ValueError):
    """The expression is not allowed, or its value is out of range."""


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression (see the module docstring for what is allowed)."""
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"not an arithmetic expression: {e}") from None
    try:
        return _eval(tree.body)
    except CalculatorError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as e:
        raise CalculatorError(f"{type(e).__name__}: {e}") from None


def _eval(node: ast.expr) -> Number:
    """Evaluate one node of the whitelisted grammar."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _call(node)
    raise CalculatorError(f"not allowed in an expression: {ast.unparse(node)!r}")


def _call(node: ast.Call) -> Number:
    """A call to one of the whitelisted functions, with positional arguments only."""
    if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS) or node.keywords:
        raise CalculatorError(f"unknown function in {ast.unparse(node)!r}; known: {', '.join(_FUNCTIONS)}")
    args = [_eval(arg) for arg in node.args]
    if (
        node.func.id == "round"
        and len(args) == 2
        and not (isinstance(args[1], int) and abs(args[1]) <= MAX_ROUND_DIGITS)
    ):
        raise CalculatorError(f"round() digits must be an integer within ±{MAX_ROUND_DIGITS}")
    return _checked(_FUNCTIONS[node.func.id](*args))


def _check_power(base: Number, exponent: Number) -> None:
    """Refuse an integer power whose result would exceed MAX_INT_BITS, before computing it."""
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > MAX_INT_BITS
    ):
        raise CalculatorError(f"result too large: more than {MAX_INT_BITS} bits")


def _checked(value: Any) -> Number:
    """A number within range (complex results are errors)."""
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError(f"result too large: more than {MAX_INT_BITS} bits")
        return value
    if isinstance(value, float):
        return value
    raise CalculatorError(f"not a real number: {value!r}")


class CalculatorTool(Tool):
    """Evaluates an arithmetic expression as soon as its argument is complete."""

    name = "calculator"
    description = (
        "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, "
        "pi, e, and sqrt, log, log10, exp, sin, cos, tan, floor, ceil, abs, round, min, max."
    )
    side_effects = "none"

    def __init__(self) -> None:
        self.parameters = {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (2 + 3) * sqrt(16)"}},
            "required": ["expression"],
            "additionalProperties": False,
        }
        self._done: tuple[str, Number] | None = None

    def on_field(self, key: str, value: Any) -> None:
        """Evaluate the expression at once; a bad one raises CalculatorError here."""
        if key == "expression":
            self._done = (value, evaluate(_as_text(value)))

    def finish(self, args: dict[str, Any]) -> Number:
        expression = args.get("expression")
        if self._done is not None and self._done[0] == expression:
            return self._done[1]
        return evaluate(_as_text(expression))


def _as_text(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if not isinstance(value, str):
        raise CalculatorError(f"expression must be a string, got {type(value).__name__}")
    return value
