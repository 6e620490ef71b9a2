"""Streaming call parsers: split invariance and FieldDone values, with hypothesis."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.tools.parsers import CallEnd, CallStart, Event, FieldDone, make_parser
from tests.unit.test_parsers import PROGRAM, merge
from tests.unit.test_parsers_formats import MIXED, PLAN

JSON_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | JSON_TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
    max_leaves=8,
)
ARGS = st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=4)

SAMPLES = {
    "hermes": [
        (
            'Hi <tool_call>\n{"name": "f", "arguments": {"a": 123, "s": "x\\"\\\\\\ud83d\\ude00 中",'
            ' "l": [1, {"b": null}], "t": true}}\n</tool_call> and\n'
            '{"name": "g", "arguments": {"n": -1.5e3}}\n```json\n{"name": "h", "arguments": {"e": "😀"}}'
            '\n```\n{not json}\n<tool_call>{"name": "k"'
        ),
        '<tool_call>{"name": "f", "arguments": {"a": 1, b}}</tool_call><tool_call>x</tool_call>',
    ],
    "python": [f"Code:\n```python\n{PROGRAM}```\nmore ```py\nx = 'é😀'\nprint(x)"],
    "plan": ['Thought: é\n1. search("中")\n2. f($1)\n3. join()<END_OF_PLAN>\nok\n1. a()'],
}


def run(kind: str, chunks: list[str]) -> list[Event]:
    parser = make_parser(kind)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return merge(events + parser.close())


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([(kind, text) for kind, texts in SAMPLES.items() for text in texts]),
    st.lists(st.integers(0, 400), max_size=30),
)
def test_any_split_gives_the_same_events(sample: tuple[str, str], cuts: list[int]) -> None:
    kind, text = sample
    assert run(kind, split(text, cuts)) == run(kind, [text])


def call_text(args: dict, indent: int | None, ensure_ascii: bool, wrap: str) -> str:
    body = json.dumps({"name": "f", "arguments": args}, indent=indent, ensure_ascii=ensure_ascii)
    return {"tag": f"<tool_call>\n{body}\n</tool_call>", "bare": body, "fence": f"```json\n{body}\n```"}[wrap]


@settings(max_examples=150, deadline=None)
@given(
    ARGS,
    st.sampled_from([None, 2]),
    st.booleans(),
    st.sampled_from(["tag", "bare", "fence"]),
    st.lists(st.integers(0, 2000), max_size=20),
)
def test_field_values_match_json_loads(
    args: dict,
    indent: int | None,
    ensure_ascii: bool,
    wrap: str,
    cuts: list[int],
) -> None:
    text = call_text(args, indent, ensure_ascii, wrap)
    whole = json.loads(text[text.index("{") : text.rindex("}") + 1])["arguments"]
    events = run("hermes", split(text, cuts))
    fields = {e.key: e.value for e in events if isinstance(e, FieldDone)}
    assert fields == whole
    assert len([e for e in events if isinstance(e, FieldDone)]) == len(whole)
    assert events[-1] == CallEnd(0, whole)


# ---- lists of calls, fence tags, multi-line plan steps, the "auto" kind ----------------------
LISTS = (
    'Plan:\n[{"name": "a", "arguments": {"x": [1, "é"]}},\n {"arguments": {"y": 2}, "name": "b"}]\n'
    '```JSON\n[{"name": "c", "arguments": {}}, {"x": 1}, 5, {"name": "d"}]\n```\n'
    '<tool_call>[{"name": "e", "arguments": {"q": 1, z}}]</tool_call>[1] cite\n[]\n'
    '```Json\n{"name": "f", "arguments": {"s": "😀"}}\n```\n```tool_call\n[{"name": "g", "arguments": {"k": 1'
)
NEW_SAMPLES = [
    ("hermes", LISTS),
    ("plan", PLAN.replace("Find", "Find é 中") + '\n1. w(\n  "中"'),
    ("auto", MIXED.replace("x = 1", 'x = {"a": "😀"}') + "\n```py\nz = 3"),
]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NEW_SAMPLES), st.lists(st.integers(0, 500), max_size=30))
def test_any_split_gives_the_same_events_for_new_formats(sample: tuple[str, str], cuts: list[int]) -> None:
    kind, text = sample
    assert run(kind, split(text, cuts)) == run(kind, [text])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(ARGS, min_size=1, max_size=3),
    st.sampled_from([None, 2]),
    st.sampled_from(["tag", "bare", "fence"]),
    st.lists(st.integers(0, 2000), max_size=20),
)
def test_list_of_calls_gives_each_call_its_fields(
    calls: list[dict],
    indent: int | None,
    wrap: str,
    cuts: list[int],
) -> None:
    body = json.dumps([{"name": f"f{i}", "arguments": a} for i, a in enumerate(calls)], indent=indent)
    text = {"tag": f"<tool_call>\n{body}\n</tool_call>", "bare": body, "fence": f"```json\n{body}\n```"}[wrap]
    events = run("hermes", split(text, cuts))
    for i, args in enumerate(calls):
        mine = [e for e in events if getattr(e, "index", None) == i]
        assert mine[0] == CallStart(i, f"f{i}")
        assert mine[1:] == [*(FieldDone(i, k, v) for k, v in args.items()), CallEnd(i, args)]
    assert len([e for e in events if isinstance(e, CallStart)]) == len(calls)


SAFE_TEXT = st.text(st.sampled_from("ab é中 .,:;!?-\n"), max_size=12)
PYTHON_BODIES = st.sampled_from(
    ["x = 1\n", PROGRAM, "for i in y:\n    f(i)\nprint(2)\n", "if a:\n    b = (\n"]
)


@st.composite
def segments(draw: st.DrawFn) -> tuple[str, str]:
    """One piece of a mixed response: (the parser that reads it alone, its text)."""
    choice = draw(st.sampled_from(["text", "python", "json"]))
    if choice == "text":
        return "hermes", draw(SAFE_TEXT)
    if choice == "python":
        return "python", f"```{draw(st.sampled_from(['python', 'py', 'Python']))}\n{draw(PYTHON_BODIES)}```"
    wrap = draw(st.sampled_from(["tag", "bare", "fence"]))
    return "hermes", call_text(draw(ARGS), draw(st.sampled_from([None, 2])), draw(st.booleans()), wrap)


def shifted(events: list[Event], by: int) -> list[Event]:
    return [dataclasses.replace(e, index=e.index + by) if hasattr(e, "index") else e for e in events]


@settings(max_examples=100, deadline=None)
@given(st.lists(segments(), max_size=5), st.lists(st.integers(0, 3000), max_size=30))
def test_auto_emits_what_each_format_parser_emits(pieces: list[tuple[str, str]], cuts: list[int]) -> None:
    expected: list[Event] = []
    for kind, text in pieces:
        alone = run(kind, [text + "\n"])
        expected += shifted(alone, len([e for e in expected if isinstance(e, CallStart)]))
    whole = "".join(text + "\n" for _, text in pieces)
    assert run("auto", split(whole, cuts)) == merge(expected)
