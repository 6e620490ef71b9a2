"""Tool-call grammars on the tiny byte-level tokenizer: names, end of turn, cache, bad input."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from conveyor.tools.grammar import ToolGrammar
from tests.tiny import byte_tokenizer

PREFIX = '<tool_call>\n{"name": "'
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "web search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "arithmetic",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
TOOLS = [SEARCH, CALC]
NAMED_SEARCH = {"type": "function", "function": {"name": "search"}}
CALL = PREFIX + 'search", "arguments": {"query": "cats"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def grammar(tokenizer) -> ToolGrammar:
    return ToolGrammar(tokenizer, len(tokenizer) + 5, [tokenizer.eos_token_id])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed_after(grammar: ToolGrammar, tokenizer, text: str, choice="required", lenient=False) -> set[int]:
    """Token ids the grammar allows after the tokens of ``text``."""
    constraint = grammar.constraint(TOOLS, choice, lenient)
    for token in ids(tokenizer, text):
        constraint.accept(token)
    assert constraint.active, f"the grammar rejected {text!r}"
    bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
    constraint.fill_mask(bitmask, 0)
    logits = torch.zeros(1, grammar.vocab_size)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def one(tokenizer, char: str) -> int:
    (token,) = ids(tokenizer, char)
    return token


def masked_argmax_by_mask(constraint, logits: torch.Tensor, vocab_size: int) -> int:
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    constraint.fill_mask(bitmask, 0)
    masked = logits.clone().unsqueeze(0)
    xgr.apply_token_bitmask_inplace(masked, bitmask)
    return int(masked[0].argmax())


@pytest.mark.parametrize("max_sparse_words", [1024, 0])  # 0: every position takes the top-logit path
def test_masked_argmax_equals_the_argmax_of_the_masked_row(
    grammar, tokenizer, monkeypatch, max_sparse_words
) -> None:
    """At every position of a call (names, keys, string content), for random logits; ties too."""
    monkeypatch.setattr("conveyor.tools.grammar.MAX_SPARSE_WORDS", max_sparse_words)
    generator = torch.Generator().manual_seed(0)
    constraint = grammar.constraint(TOOLS, "required")
    num_found = 0
    for token in ids(tokenizer, CALL):
        for logits in (torch.randn(grammar.vocab_size, generator=generator), torch.zeros(grammar.vocab_size)):
            got = constraint.masked_argmax(logits, num_top=16)
            assert got in (None, masked_argmax_by_mask(constraint, logits, grammar.vocab_size)), (token, got)
            num_found += got is not None
        constraint.accept(token)
    # sparse words (this 264-token vocabulary is 9 words): always found; the top-16 path gives up (None:
    # mask instead) where no allowed token is among the 16 or a tie reaches the cut (all zeros)
    assert num_found == 2 * len(ids(tokenizer, CALL)) if max_sparse_words else num_found > 0
    assert constraint.try_accept(tokenizer.eos_token_id)


def test_masked_argmax_gives_up_where_no_top_logit_is_allowed(grammar, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr("conveyor.tools.grammar.MAX_SPARSE_WORDS", 0)
    constraint = grammar.constraint(TOOLS, "required")
    for token in ids(tokenizer, PREFIX):
        constraint.accept(token)
    logits = torch.zeros(grammar.vocab_size)
    x = one(tokenizer, "x")
    logits[x] = 1.0
    assert constraint.masked_argmax(logits, num_top=1) is None  # "x" starts no tool name
    logits[one(tokenizer, "c")] = 0.5
    assert constraint.masked_argmax(logits, num_top=2) is None  # 0.5 is the cut: a tie may go on past it
    assert constraint.masked_argmax(logits, num_top=3) == one(tokenizer, "c")
    assert constraint.try_accept(one(tokenizer, "s"))  # reading the bits did not move the matcher


def test_mask_allows_only_known_tool_names(grammar, tokenizer) -> None:
    allowed = allowed_after(grammar, tokenizer, PREFIX)
    assert allowed == {one(tokenizer, "s"), one(tokenizer, "c")}
    assert one(tokenizer, "x") not in allowed


def test_named_choice_allows_only_that_tool(grammar, tokenizer) -> None:
    assert allowed_after(grammar, tokenizer, PREFIX, NAMED_SEARCH) == {one(tokenizer, "s")}


def test_arguments_follow_the_schema(grammar, tokenizer) -> None:
    allowed = allowed_after(grammar, tokenizer, PREFIX + 'search", "arguments": {"query": "a", "')
    assert one(tokenizer, "k") in allowed and one(tokenizer, "z") not in allowed


def test_required_ends_only_after_a_whole_call(grammar, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    assert eos not in allowed_after(grammar, tokenizer, "")
    assert one(tokenizer, "<") in allowed_after(grammar, tokenizer, "")
    assert eos not in allowed_after(grammar, tokenizer, CALL[:-3])
    after = allowed_after(grammar, tokenizer, CALL)
    assert after == {eos, one(tokenizer, "\n")}  # end, or a second call
    assert eos in allowed_after(grammar, tokenizer, CALL + "\n" + CALL)


def test_named_choice_is_exactly_one_call(grammar, tokenizer) -> None:
    assert allowed_after(grammar, tokenizer, CALL, NAMED_SEARCH) == {tokenizer.eos_token_id}


def test_auto_is_free_text_until_the_trigger(grammar, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    free = allowed_after(grammar, tokenizer, "Sure, here", "auto")
    assert eos in free and one(tokenizer, "x") in free
    assert allowed_after(grammar, tokenizer, "Let me look. " + PREFIX, "auto") == {
        one(tokenizer, "s"),
        one(tokenizer, "c"),
    }
    assert eos in allowed_after(grammar, tokenizer, "Let me look. " + CALL + " Done", "auto")


def test_padding_ids_beyond_the_tokenizer_are_never_allowed(grammar, tokenizer) -> None:
    assert max(allowed_after(grammar, tokenizer, "hi", "auto")) < len(tokenizer)


def test_stop_token_ends_the_turn(grammar, tokenizer) -> None:
    constraint = grammar.constraint(TOOLS, "required")
    for token in ids(tokenizer, CALL) + [tokenizer.eos_token_id]:
        constraint.accept(token)
    assert constraint.is_terminated and not constraint.active


def test_rejected_token_stops_constraining_without_raising(grammar, tokenizer) -> None:
    constraint = grammar.constraint(TOOLS, "required")
    for token in ids(tokenizer, PREFIX + "x"):
        constraint.accept(token)
    assert not constraint.active and not constraint.is_terminated
    constraint.accept(one(tokenizer, "y"))  # still harmless


def test_compiled_once_per_tools_and_choice(grammar) -> None:
    assert grammar.compiled(TOOLS, "required") is grammar.compiled([dict(t) for t in TOOLS], "required")
    assert grammar.compiled(TOOLS, "required") is not grammar.compiled(TOOLS, "auto")


def test_none_or_no_tools_is_unconstrained(grammar) -> None:
    assert grammar.constraint(TOOLS, "none") is None
    assert grammar.constraint([], "required") is None


@pytest.mark.parametrize(
    "tools, choice, message",
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "nope"),
        (TOOLS, "sometimes", "sometimes"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "vector"}}}],
            "auto",
            "grammar",
        ),
    ],
)
def test_bad_choice_or_schema_is_a_value_error(grammar, tools, choice, message) -> None:
    with pytest.raises(ValueError, match=message):
        grammar.constraint(tools, choice)


def test_a_bounded_compile_matches_and_a_runaway_one_is_stopped(tokenizer, grammar) -> None:
    bounded = ToolGrammar(tokenizer, len(tokenizer) + 5, [tokenizer.eos_token_id], compile_timeout_s=120.0)
    try:
        for text in (CALL, PREFIX + 'calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'):
            assert allowed_after(bounded, tokenizer, text[:-3]) == allowed_after(
                grammar, tokenizer, text[:-3]
            )
        helper = bounded._compiler._helper[0]
        bounded._compiler.timeout_s = 1e-4  # as if it ran away: killed, not left running
        with pytest.raises(ValueError, match="grammar compile stopped after"):
            bounded.compiled([SEARCH], "required")
        assert bounded._compiler.num_killed == 1 and not helper.is_alive()
    finally:
        bounded._compiler.close()


@pytest.mark.parametrize("opening", ['Here: ```json\n{"name": "', 'Here:\n{"name": "', PREFIX])
def test_lenient_auto_constrains_fenced_and_bare_calls_to_offered_tools(grammar, tokenizer, opening) -> None:
    """Every format a lenient parser reads as a call names an offered tool (issue 22 item 4)."""
    assert allowed_after(grammar, tokenizer, opening, "auto", lenient=True) == {
        one(tokenizer, "s"),
        one(tokenizer, "c"),
    }


def test_lenient_auto_fenced_call_closes_its_fence_and_text_goes_on(grammar, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    fenced = '```json\n{"name": "search", "arguments": {"query": "cats"}}\n```'
    closing = allowed_after(grammar, tokenizer, "Sure. " + fenced[:-1], "auto", lenient=True)
    assert closing == {one(tokenizer, "`")}
    after = allowed_after(grammar, tokenizer, "Sure. " + fenced + " Done", "auto", lenient=True)
    assert eos in after and one(tokenizer, "x") in after
    bare = '{"name": "calculator", "arguments": {"expression": "1+1"}}'
    assert eos in allowed_after(grammar, tokenizer, bare + "\nThat is all.", "auto", lenient=True)


def test_strict_auto_leaves_fences_free(grammar, tokenizer) -> None:
    allowed = allowed_after(grammar, tokenizer, '```json\n{"name": "', "auto")
    assert one(tokenizer, "x") in allowed
