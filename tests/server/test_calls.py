"""CallStream's policy, without a server: whose call is it, and what is no call at all."""

from __future__ import annotations

from conveyor.server.calls import CallStream, merge

TAGGED = '<tool_call>\n{"name": "%s", "arguments": {"a": 1}}\n</tool_call>'
FENCED = 'See:\n```json\n{"name": "f", "arguments": {"a": 1}}\n```\n{"name": "f", "arguments": {"a": 2}}\n'


def run(stream: CallStream, text: str) -> list[dict]:
    return merge(stream.feed(text)) + merge(stream.end_turn()[0])


def test_without_server_tools_an_unoffered_call_is_text():
    stream = CallStream("r", set(), parse=True, client_tools={"f"}, lenient=False)
    deltas = run(stream, "x " + TAGGED % "g")
    assert not stream.calls
    assert "".join(d["content"] for d in deltas) == 'x {"name": "g", "arguments": {"a": 1}}'


def test_with_server_tools_an_unoffered_call_is_the_servers():
    stream = CallStream("r", {"s"}, parse=True, client_tools={"f"}, lenient=False)
    run(stream, TAGGED % "g" + TAGGED % "f")
    assert [(c.name, c.server) for c in stream.calls] == [("g", True), ("f", False)]
    assert [c.name for c in stream.client_calls] == ["f"]


def test_strict_streams_leave_fences_and_bare_json_as_text():
    strict = CallStream("r", set(), parse=True, client_tools={"f"}, lenient=False)
    assert "".join(d.get("content", "") for d in run(strict, FENCED)) == FENCED and not strict.calls
    lenient = CallStream("r", set(), parse=True, client_tools={"f"}, lenient=True)
    run(lenient, FENCED)
    assert [c.as_tool_call()["function"]["arguments"] for c in lenient.calls] == ['{"a": 1}', '{"a": 2}']


def test_every_lenient_format_naming_an_unoffered_tool_stays_text():
    """Tagged, fenced and bare JSON calls are all checked against the offered names."""
    text = (
        "a "
        + TAGGED % "g"
        + '\n```json\n{"name": "g", "arguments": {"a": 2}}\n```\n{"name": "g", "arguments": {"a": 3}}\n'
    )
    stream = CallStream("r", set(), parse=True, client_tools={"f"}, lenient=True)
    content = "".join(d.get("content", "") for d in run(stream, text))
    assert not stream.calls and all(f'"a": {i}' in content for i in (1, 2, 3))
    served = CallStream("r", {"s"}, parse=True, client_tools={"f"}, lenient=True)
    run(served, text + TAGGED % "f")
    assert [c.name for c in served.client_calls] == ["f"]  # the server answers the others with an error
