"""Constrained tool calls through the engine on a tiny random model: whatever the weights,
the reply parses as calls of known tools with schema-valid arguments."""

from __future__ import annotations

import jsonschema
import pytest

from conveyor.core.request import SamplingParams
from conveyor.tools.grammar import ToolGrammar
from conveyor.tools.parsers import CallEnd, CallStart, make_parser
from tests.engine.helpers import assert_all_blocks_free, make_engine

# bounded by `pattern`, not `maxLength`: xgrammar 0.2.8 lets raw control characters into
# maxLength strings (invalid JSON); patterns and plain strings exclude them
SCHEMAS = {
    "search": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
            "k": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    "calculator": {
        "type": "object",
        "properties": {"expression": {"type": "string", "pattern": "^[0-9+*/() -]{1,12}$"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
PROMPTS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "user", "content": "Find cat facts."}],
]
SAMPLINGS = [SamplingParams(max_tokens=400)] + [
    SamplingParams(max_tokens=400, temperature=0.8, top_p=0.95, seed=seed) for seed in (1, 2, 3)
]


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    return make_engine(tiny_qwen2, num_blocks=512, block_size=4, budget=64)


@pytest.fixture(scope="module")
def grammar(engine) -> ToolGrammar:
    return ToolGrammar(
        engine.tokenizer, engine.runner.args.vocab_size, engine.eos_token_ids, max_whitespace=2
    )


def calls(text: str) -> list[tuple[str, dict | str]]:
    """(name, arguments) of every call the hermes parser finds in ``text``."""
    parser = make_parser("hermes")
    events = parser.feed(text) + parser.close()
    names = {e.index: e.name for e in events if isinstance(e, CallStart)}
    return [(names[e.index], e.args) for e in events if isinstance(e, CallEnd)]


def run(engine, prompts, params: SamplingParams, constraints) -> list[str]:
    ids = [engine.add_request(p, params, constraint=c) for p, c in zip(prompts, constraints)]
    requests = [engine.get_request(i) for i in ids]
    while engine.has_unfinished:
        engine.step()
    assert_all_blocks_free(engine)
    return [engine.tokenizer.decode(r.output_token_ids, skip_special_tokens=True) for r in requests]


def assert_valid_calls(text: str, names: set[str]) -> None:
    found = calls(text)
    assert found, f"no call in {text!r}"
    for name, args in found:
        assert name in names, text
        assert isinstance(args, dict), f"arguments did not parse: {text!r}"
        jsonschema.validate(args, SCHEMAS[name])


@pytest.mark.parametrize("params", SAMPLINGS, ids=["greedy", "seed1", "seed2", "seed3"])
def test_required_replies_are_valid_calls(engine, grammar, params) -> None:
    constraints = [grammar.constraint(TOOLS, "required") for _ in PROMPTS]
    for text in run(engine, PROMPTS, params, constraints):
        assert_valid_calls(text, set(SCHEMAS))


@pytest.mark.parametrize("params", SAMPLINGS[:2], ids=["greedy", "seed1"])
def test_named_choice_is_one_call_of_that_tool(engine, grammar, params) -> None:
    named = {"type": "function", "function": {"name": "calculator"}}
    constraints = [grammar.constraint(TOOLS, named) for _ in PROMPTS]
    for text in run(engine, PROMPTS, params, constraints):
        assert_valid_calls(text, {"calculator"})
        assert len(calls(text)) == 1 and text.endswith("</tool_call>")


def test_unconstrained_neighbour_is_unaffected(engine, grammar) -> None:
    free = [{"role": "user", "content": "Tell me a story."}]
    params = SamplingParams(max_tokens=60)
    (alone,) = run(engine, [free], params, [None])
    together = run(engine, [free] + PROMPTS, params, [None] + [grammar.constraint(TOOLS, "required")] * 2)
    assert together[0] == alone
    assert calls(alone) == []
