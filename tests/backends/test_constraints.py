"""The remote forms of the tool-call constraint (backends/constraints.py), as plain data."""

from __future__ import annotations

import json

import pytest

from conveyor.backends.constraints import FORMS, TurnForm, remote_form
from conveyor.config import BACKEND_DIALECTS
from conveyor.tools.grammar import structural_tag


def spec(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


SPECS = [spec("search"), spec("fetch")]


def test_llama_cpp_named_choice_is_a_json_schema_after_a_forced_call_start() -> None:
    form = remote_form("llama.cpp", SPECS, {"type": "function", "function": {"name": "fetch"}})
    assert [v["properties"]["name"] for v in form.fields["json_schema"]["anyOf"]] == [{"const": "fetch"}]
    assert (form.opening, form.closing) == ("<tool_call>\n", "\n</tool_call>")


def test_llama_cpp_auto_is_a_lazy_grammar_of_the_tools_calls() -> None:
    form = remote_form("llama.cpp", SPECS, "auto")
    assert form.fields["grammar_lazy"] is True and form.fields["grammar_triggers"] == [
        {"type": 1, "value": "<tool_call>"}
    ]
    grammar = form.fields["grammar"]
    assert (
        grammar.startswith('root ::= "<tool_call>\\n{"') and '( "\\"search\\"" | "\\"fetch\\"" )' in grammar
    )
    assert grammar.split("\n")[0].endswith('"}" "\\n</tool_call>"') and (form.opening, form.closing) == (
        "",
        "",
    )


def test_vllm_gets_the_embedded_structural_tag_for_every_choice() -> None:
    for choice in ("auto", "required", {"type": "function", "function": {"name": "search"}}):
        sent = remote_form("vllm", SPECS, choice).fields["structured_outputs"]["structural_tag"]
        names = [spec("search")] if isinstance(choice, dict) else SPECS
        assert json.loads(sent) == json.loads(structural_tag(names, choice).model_dump_json())


def test_no_constraint_for_the_none_dialect_and_clear_errors() -> None:
    assert remote_form("none", SPECS, "required") == TurnForm()
    with pytest.raises(ValueError, match="not among"):
        remote_form("none", SPECS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="unknown backend dialect"):
        remote_form("sglang", SPECS, "auto")


def test_every_configured_dialect_has_a_form() -> None:
    assert list(FORMS) == list(BACKEND_DIALECTS)
