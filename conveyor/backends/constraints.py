"""Remote forms of the embedded engine's tool-call constraint, one per dialect of remote engine.

The embedded engine constrains a model turn with an xgrammar structural tag (`tools/grammar.py`):
for "auto", free text and, after each `<tool_call>`, a call whose name is one of the tools and whose
arguments fit that tool's schema; for a named or "required" choice, calls only. A remote engine
gets the nearest form it accepts:

- **vllm**: the very same structural tag (vLLM compiles structural tags with xgrammar), for every
  choice, in `structured_outputs`.
- **llama.cpp**: a named or "required" turn starts with CALL_OPEN, written into the prompt, and its
  JSON is constrained by `json_schema` (one call, whose arguments fit the tool's schema).
  llama.cpp's grammar ends at the JSON's last brace, where only a stop token may follow, so
  CALL_CLOSE is added to the turn after a clean stop: the conversation then reads as the model
  writes a call (without it, the default model went on calling the tool). An "auto" turn gets a
  lazy GBNF grammar triggered by `<tool_call>`: one of the tools' names, JSON arguments,
  `</tool_call>`, then the end of the turn. Those arguments are any JSON object, not the tool's
  schema: llama.cpp builds with LLGuidance turn `json_schema` into a grammar that cannot be lazy.
  The tool still validates its arguments.
- **none**: nothing; the remote engine decodes freely.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.config import BACKEND_DIALECTS
from conveyor.tools.parsers import HERMES_CALL

CALL_OPEN, CALL_CLOSE = HERMES_CALL  # the Hermes/Qwen call format's start and end
TRIGGER_WORD = 1  # llama.cpp's COMMON_GRAMMAR_TRIGGER_TYPE_WORD

# JSON values for GBNF, after llama.cpp's grammars/json.gbnf; `ws` caps a run of blanks as the
# embedded grammar's max_whitespace does.
_JSON_GBNF = r"""
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]{1,16} )? ws
ws ::= | " " | "\n" [ \t]{0,16}
"""


@dataclass(frozen=True, slots=True)
class TurnForm:
    """How one turn is asked of the remote engine: extra body fields, text the turn is forced to
    start with (appended to the prompt) and text added to the turn after a clean stop."""

    fields: dict[str, Any] = field(default_factory=dict)
    opening: str = ""
    closing: str = ""


def caller_forms(constraint: Any) -> Callable[[int], TurnForm] | None:
    """A caller's constraint as a factory of TurnForms per turn number: a dict of body fields
    for the first turn, or a callable of the turn number returning one; None: none given."""
    if constraint is None:
        return None
    if callable(constraint):
        return lambda turn: TurnForm(dict(constraint(turn) or {}))
    if isinstance(constraint, dict):
        return lambda turn: TurnForm(dict(constraint) if turn == 0 else {})
    raise ValueError("a remote constraint is a dict of request fields or a callable returning one")


def call_schema(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call, `{"name": ..., "arguments": ...}`, of any of the tools `specs`."""
    return {
        "anyOf": [
            {
                "type": "object",
                "required": ["name", "arguments"],
                "additionalProperties": False,
                "properties": {
                    "name": {"const": s["function"]["name"]},
                    "arguments": s["function"].get("parameters") or {"type": "object"},
                },
            }
            for s in specs
        ]
    }


def remote_form(dialect: str, specs: list[dict[str, Any]], choice: str | dict[str, Any]) -> TurnForm:
    """How a remote engine of `dialect` is asked to constrain a turn to `choice` ("auto",
    "required" or a named tool) among the OpenAI tool specs `specs`; see the module docstring."""
    if dialect not in BACKEND_DIALECTS:
        raise ValueError(f"unknown backend dialect {dialect!r}; choose from {', '.join(BACKEND_DIALECTS)}")
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        specs = [s for s in specs if s["function"]["name"] == name]
        if not specs:
            raise ValueError(f"tool_choice names {name!r}, which is not among the request's tools")
    return FORMS[dialect](specs, choice) if specs else TurnForm()


def _vllm_form(specs: list[dict[str, Any]], choice: str | dict[str, Any]) -> TurnForm:
    from conveyor.tools.grammar import structural_tag

    return TurnForm(
        {"structured_outputs": {"structural_tag": structural_tag(specs, choice).model_dump_json()}}
    )


def _llamacpp_form(specs: list[dict[str, Any]], choice: str | dict[str, Any]) -> TurnForm:
    if choice == "auto":
        return TurnForm(lazy_call_grammar([s["function"]["name"] for s in specs]))
    return TurnForm({"json_schema": call_schema(specs)}, CALL_OPEN, CALL_CLOSE)


# each dialect of config.BACKEND_DIALECTS (the names and their help) and its form
FORMS: dict[str, Callable[[list[dict[str, Any]], str | dict[str, Any]], TurnForm]] = {
    "llama.cpp": _llamacpp_form,
    "vllm": _vllm_form,
    "none": lambda specs, choice: TurnForm(),
}


def lazy_call_grammar(names: list[str]) -> dict[str, Any]:
    """llama.cpp request fields for an "auto" turn: a GBNF grammar of one call of the tools
    `names`, lazy until the model writes `<tool_call>`."""
    name = " | ".join(_gbnf_literal(json.dumps(n)) for n in names)
    root = (
        f'root ::= {_gbnf_literal(CALL_OPEN + "{")} ws {_gbnf_literal(json.dumps("name"))} ":" ws ( {name} ) '
        f'ws "," ws {_gbnf_literal(json.dumps("arguments"))} ":" ws object "}}" {_gbnf_literal(CALL_CLOSE)}'
    )
    return {
        "grammar": root + _JSON_GBNF,
        "grammar_lazy": True,
        "grammar_triggers": [{"type": TRIGGER_WORD, "value": CALL_OPEN.strip()}],
        "preserved_tokens": [CALL_OPEN.strip(), CALL_CLOSE.strip()],
    }


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
