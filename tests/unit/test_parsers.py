"""Streaming call parsers: hand-written cases per format."""

from __future__ import annotations

import pytest

from conveyor.tools.parsers import (
    CallEnd,
    CallStart,
    Event,
    FieldDone,
    Line,
    PlanStep,
    Text,
    make_parser,
    parse_step,
)


def parse(kind: str, text: str) -> list[Event]:
    """Feed the whole text at once, close, and merge adjacent Text deltas."""
    parser = make_parser(kind)
    return merge(parser.feed(text) + parser.close())


def merge(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if isinstance(event, Text) and out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].delta + event.delta)
        else:
            out.append(event)
    return out


def test_hermes_tagged_call_with_nested_values_and_text_around() -> None:
    text = (
        'Let me check. <tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, 2.5]}, '
        '"s": "q\\"\\\\\\u00e9", "t": true, "n": null, "z": -12}}\n</tool_call> Done.'
    )
    assert parse("hermes", text) == [
        Text("Let me check. "),
        CallStart(0, "f"),
        FieldDone(0, "a", {"b": [1, 2.5]}),
        FieldDone(0, "s", 'q"\\é'),
        FieldDone(0, "t", True),
        FieldDone(0, "n", None),
        FieldDone(0, "z", -12),
        CallEnd(0, {"a": {"b": [1, 2.5]}, "s": 'q"\\é', "t": True, "n": None, "z": -12}),
        Text(" Done."),
    ]


def test_number_completes_only_at_a_delimiter() -> None:
    parser = make_parser("hermes")
    assert parser.feed('<tool_call>{"name": "f", "arguments": {"x": 12') == [CallStart(0, "f")]
    assert parser.feed("3") == []
    assert parser.feed("}") == [FieldDone(0, "x", 123)]
    assert parser.feed("}") == [CallEnd(0, {"x": 123})]


def test_field_is_emitted_as_soon_as_its_value_closes() -> None:
    parser = make_parser("hermes")
    assert parser.feed('<tool_call>{"name": "f", "arguments": {"q": "ab') == [CallStart(0, "f")]
    assert parser.feed('c", "r"') == [FieldDone(0, "q", "abc")]


def test_unicode_and_surrogate_pair_escape() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"e": "😀 中文", "u": "\\ud83d\\ude00"}}</tool_call>'
    assert parse("hermes", text) == [
        CallStart(0, "f"),
        FieldDone(0, "e", "😀 中文"),
        FieldDone(0, "u", "😀"),
        CallEnd(0, {"e": "😀 中文", "u": "😀"}),
    ]


def test_two_calls_and_missing_closing_tag() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>\n{\n  "name": "b",\n  "arguments": {\n    "k": false\n  }\n}'
    )
    assert parse("hermes", text) == [
        CallStart(0, "a"),
        CallEnd(0, {}),
        Text("\n"),
        CallStart(1, "b"),
        FieldDone(1, "k", False),
        CallEnd(1, {"k": False}),
    ]


def test_bare_json_and_json_fence_are_calls() -> None:
    text = (
        'Here:\n{"name": "search", "arguments": {"q": "x"}}\n'
        '```json\n{"arguments": {"n": 1}, "name": "calc"}\n```\nbye'
    )
    assert parse("hermes", text) == [
        Text("Here:\n"),
        CallStart(0, "search"),
        FieldDone(0, "q", "x"),
        CallEnd(0, {"q": "x"}),
        Text("\n"),
        CallStart(1, "calc"),
        FieldDone(1, "n", 1),
        CallEnd(1, {"n": 1}),
        Text("\nbye"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "a {b} c\n{not json}\n",
        '{"a": 1, "name": "x"}\n',
        '```json\n{"name": "x"}\n```\n',
        "```json\n[1, 2]\n```",
        '{"name": "f", "argu',
    ],
)
def test_json_that_is_not_a_call_stays_text(text: str) -> None:
    assert parse("hermes", text) == [Text(text)]


def test_malformed_call_ends_with_raw_text() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, b: 2}}</tool_call>ok'
    assert parse("hermes", text) == [
        CallStart(0, "f"),
        FieldDone(0, "a", 1),
        CallEnd(0, '{"name": "f", "arguments": {"a": 1, b: 2}}'),
        Text("ok"),
    ]


def test_unnamed_tagged_block_is_text_and_truncated_call_is_raw() -> None:
    assert parse("hermes", "<tool_call>oops</tool_call>") == [Text("<tool_call>oops</tool_call>")]
    assert parse("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1') == [
        CallStart(0, "f"),
        CallEnd(0, '{"name": "f", "arguments": {"a": 1'),
    ]


def test_string_arguments_are_decoded() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1]}"}</tool_call>'
    assert parse("hermes", text) == [CallStart(0, "f"), FieldDone(0, "a", [1]), CallEnd(0, {"a": [1]})]


PROGRAM = '''import math
total = 0
for i in range(3):
    total += i

    print(i)
# a comment
def area(r):
    """Circle."""
    return math.pi * r ** 2
values = [
    1,
2,
]
if total:
    pass
else:
    total = 1
print(area(2), values)
'''


def test_python_fence_emits_whole_statements() -> None:
    text = f"Here is code:\n```python\n{PROGRAM}```\nThat's it."
    assert parse("python", text) == [
        Text("Here is code:\n"),
        CallStart(0, "python"),
        Line(0, "import math"),
        Line(0, "total = 0"),
        Line(0, "for i in range(3):\n    total += i\n\n    print(i)\n# a comment"),
        Line(0, 'def area(r):\n    """Circle."""\n    return math.pi * r ** 2'),
        Line(0, "values = [\n    1,\n2,\n]"),
        Line(0, "if total:\n    pass\nelse:\n    total = 1"),
        Line(0, "print(area(2), values)"),
        CallEnd(0, PROGRAM),
        Text("\nThat's it."),
    ]


def test_python_statement_waits_for_the_next_top_level_line() -> None:
    parser = make_parser("python")
    assert parser.feed("```py\nfor i in x:\n    a(i)\n") == [CallStart(0, "python")]
    assert parser.feed("    b(i)\nprint(") == []
    assert parser.feed("i)\n") == [Line(0, "for i in x:\n    a(i)\n    b(i)")]
    assert parser.close() == [Line(0, "print(i)"), CallEnd(0, "for i in x:\n    a(i)\n    b(i)\nprint(i)\n")]


def test_python_close_without_fence_drops_a_cut_statement() -> None:
    parser = make_parser("python")
    parser.feed("```python\nx = 1\nprint(")
    assert parser.close() == [Line(0, "x = 1"), CallEnd(0, "x = 1\nprint(")]
    parser = make_parser("python")
    parser.feed("```python\nx = 1\ny = 2")
    assert parser.close() == [Line(0, "x = 1"), Line(0, "y = 2"), CallEnd(0, "x = 1\ny = 2")]


def test_two_python_fences() -> None:
    text = "```python\na = 1\n```\nand\n```python\nb = 2\n```"
    assert parse("python", text) == [
        CallStart(0, "python"),
        Line(0, "a = 1"),
        CallEnd(0, "a = 1\n"),
        Text("\nand\n"),
        CallStart(1, "python"),
        Line(1, "b = 2"),
        CallEnd(1, "b = 2\n"),
    ]


def test_plan_lines_with_references() -> None:
    text = 'Thought: find it.\n1. search("x")\n2. search("y")\n3. summarize($1, ${2})\n4. join()<END_OF_PLAN>'
    steps = ['1. search("x")', '2. search("y")', "3. summarize($1, ${2})", "4. join()"]
    assert parse("plan", text) == [
        Text("Thought: find it.\n"),
        CallStart(0, "plan"),
        *[Line(0, s) for s in steps],
        CallEnd(0, "\n".join(steps)),
    ]
    assert parse_step(steps[2]) == PlanStep(3, "summarize", "$1, ${2}", (1, 2))
    assert parse_step("Thought: no") is None


def test_plan_without_end_marker_ends_at_close() -> None:
    assert parse("plan", "1. a()\n2. b($1)") == [
        CallStart(0, "plan"),
        Line(0, "1. a()"),
        Line(0, "2. b($1)"),
        CallEnd(0, "1. a()\n2. b($1)"),
    ]


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        make_parser("xml")
