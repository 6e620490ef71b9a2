"""Streaming call parsers: split invariance and FieldDone values, with hypothesis."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.tools.parsers import CallEnd, Event, FieldDone, make_parser
from tests.unit.test_parsers import PROGRAM, merge

JSON_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | \
    st.floats(allow_nan=False, allow_infinity=False, width=32) | JSON_TEXT
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
@given(st.sampled_from([(kind, text) for kind, texts in SAMPLES.items() for text in texts]),
       st.lists(st.integers(0, 400), max_size=30))
def test_any_split_gives_the_same_events(sample: tuple[str, str], cuts: list[int]) -> None:
    kind, text = sample
    assert run(kind, split(text, cuts)) == run(kind, [text])


def call_text(args: dict, indent: int | None, ensure_ascii: bool, wrap: str) -> str:
    body = json.dumps({"name": "f", "arguments": args}, indent=indent, ensure_ascii=ensure_ascii)
    return {"tag": f"<tool_call>\n{body}\n</tool_call>", "bare": body, "fence": f"```json\n{body}\n```"}[wrap]


@settings(max_examples=150, deadline=None)
@given(ARGS, st.sampled_from([None, 2]), st.booleans(), st.sampled_from(["tag", "bare", "fence"]),
       st.lists(st.integers(0, 2000), max_size=20))
def test_field_values_match_json_loads(
    args: dict, indent: int | None, ensure_ascii: bool, wrap: str, cuts: list[int],
) -> None:
    text = call_text(args, indent, ensure_ascii, wrap)
    whole = json.loads(text[text.index("{"):text.rindex("}") + 1])["arguments"]
    events = run("hermes", split(text, cuts))
    fields = {e.key: e.value for e in events if isinstance(e, FieldDone)}
    assert fields == whole
    assert len([e for e in events if isinstance(e, FieldDone)]) == len(whole)
    assert events[-1] == CallEnd(0, whole)
