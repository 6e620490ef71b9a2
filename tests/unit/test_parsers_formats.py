"""Streaming call parsers: lists of calls, fence tags, multi-line plan steps, the "auto" kind."""

from __future__ import annotations

import pytest

from conveyor.tools.parsers import (
    CallEnd,
    CallStart,
    FieldDone,
    Line,
    PlanStep,
    Text,
    make_parser,
    parse_step,
)
from tests.unit.test_parsers import parse

LIST = '[{"name": "a", "arguments": {"x": 1}},\n {"arguments": {"y": [2]}, "name": "b"}]'
LIST_EVENTS = [
    CallStart(0, "a"),
    FieldDone(0, "x", 1),
    CallEnd(0, {"x": 1}),
    CallStart(1, "b"),
    FieldDone(1, "y", [2]),
    CallEnd(1, {"y": [2]}),
]


@pytest.mark.parametrize(
    "opener,closer",
    [
        ("", ""),
        ("<tool_call>\n", "\n</tool_call>"),
        ("```json\n", "\n```"),
        ("```tool_call\n", "\n```"),
    ],
)
def test_list_of_calls_gives_one_call_per_element(opener: str, closer: str) -> None:
    text = f"Plan:\n{opener}{LIST}{closer}\nbye"
    assert parse("hermes", text) == [Text("Plan:\n"), *LIST_EVENTS, Text("\nbye")]


def test_list_elements_start_as_soon_as_they_are_named() -> None:
    parser = make_parser("hermes")
    assert parser.feed('[{"name": "a", "arguments": {"x": 1}}, {"name": "b"') == [
        CallStart(0, "a"),
        FieldDone(0, "x", 1),
        CallEnd(0, {"x": 1}),
        CallStart(1, "b"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[1] Smith et al.\n[ ] todo\n[link](url)\n[]\n",
        '[{"a": 1}, {"name": "f", "arguments": {}}]\n',
        '```json\n[{"name": "f"}]\n```',
        "<tool_call>[]</tool_call>",
    ],
)
def test_list_that_is_not_calls_stays_text(text: str) -> None:
    assert parse("hermes", text) == [Text(text)]


def test_list_skips_later_non_calls_and_ends_a_malformed_element_raw() -> None:
    text = (
        '<tool_call>[{"name": "a", "arguments": {}}, {"x": 1}, 5, {"name": "c"}]</tool_call>\n'
        '<tool_call>[{"name": "d", "arguments": {"q": 1, z}}]</tool_call>ok'
    )
    assert parse("hermes", text) == [
        CallStart(0, "a"),
        CallEnd(0, {}),
        CallStart(1, "c"),
        CallEnd(1, {}),
        Text("\n"),
        CallStart(2, "d"),
        FieldDone(2, "q", 1),
        CallEnd(2, '{"name": "d", "arguments": {"q": 1, z}}]'),
        Text("ok"),
    ]


def test_truncated_list_keeps_its_finished_calls() -> None:
    assert parse("hermes", '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": 1') == [
        CallStart(0, "a"),
        CallEnd(0, {}),
        CallStart(1, "b"),
        CallEnd(1, '{"name": "b", "arguments": {"k": 1'),
    ]


@pytest.mark.parametrize("tag", ["JSON", "Json", "jSoN", "TOOL_CALL"])
def test_fence_language_tag_ignores_case(tag: str) -> None:
    text = f'```{tag}\n{{"name": "f", "arguments": {{"a": 1}}}}\n```\nok'
    assert parse("hermes", text) == [
        CallStart(0, "f"),
        FieldDone(0, "a", 1),
        CallEnd(0, {"a": 1}),
        Text("\nok"),
    ]


def test_python_fence_tag_ignores_case() -> None:
    assert parse("python", "```Python\nx = 1\n```") == [
        CallStart(0, "python"),
        Line(0, "x = 1"),
        CallEnd(0, "x = 1\n"),
    ]


PLAN = (
    'Thought: go.\n1. search(\n    "x",\n    k=3,\n)\n2. f($1, """a\nb""")\n'
    "3. g(\n4. h()\n5. Find the thing\nmore text\n6. z(<END_OF_PLAN>"
)


def test_plan_step_spans_lines_until_its_brackets_close() -> None:
    steps = [
        '1. search(\n    "x",\n    k=3,\n)',
        '2. f($1, """a\nb""")',
        "3. g(",
        "4. h()",
        "5. Find the thing",
    ]
    assert parse("plan", PLAN) == [
        Text("Thought: go.\n"),
        CallStart(0, "plan"),
        *[Line(0, s) for s in steps],
        Text("more text\n"),
        Line(0, "6. z("),
        CallEnd(0, "\n".join([*steps, "6. z("])),
    ]
    assert parse_step(steps[0]) == PlanStep(1, "search", '\n    "x",\n    k=3,\n', ())
    assert parse_step(steps[1]) == PlanStep(2, "f", '$1, """a\nb"""', (1,))


def test_plan_step_waits_for_its_closing_bracket() -> None:
    parser = make_parser("plan")
    assert parser.feed('1. search(\n  "x"\n') == [CallStart(0, "plan")]
    assert parser.feed(")\n") == [Line(0, '1. search(\n  "x"\n)')]


MIXED = (
    "Let me compute.\n```python\nx = 1\nprint(x)\n```\n"
    '{"name": "f", "arguments": {"a": 1}}\n```Python\ny = 2\n```<tool_call>[{"name": "g", "arguments": {}}]'
    '</tool_call>\n```json\n{"name": "h", "arguments": {}}\n```'
)


def test_auto_accepts_json_calls_and_python_fences_together() -> None:
    assert parse("auto", MIXED) == [
        Text("Let me compute.\n"),
        CallStart(0, "python"),
        Line(0, "x = 1"),
        Line(0, "print(x)"),
        CallEnd(0, "x = 1\nprint(x)\n"),
        Text("\n"),
        CallStart(1, "f"),
        FieldDone(1, "a", 1),
        CallEnd(1, {"a": 1}),
        Text("\n"),
        CallStart(2, "python"),
        Line(2, "y = 2"),
        CallEnd(2, "y = 2\n"),
        CallStart(3, "g"),
        CallEnd(3, {}),
        Text("\n"),
        CallStart(4, "h"),
        CallEnd(4, {}),
    ]


def test_auto_sees_no_json_inside_a_python_fence_and_ends_an_open_fence_at_close() -> None:
    text = '```python\nd = {"name": "f", "arguments": {}}\n<tool_call>'
    assert parse("auto", text) == [
        CallStart(0, "python"),
        Line(0, 'd = {"name": "f", "arguments": {}}'),
        CallEnd(0, 'd = {"name": "f", "arguments": {}}\n<tool_call>'),
    ]
