"""Detokenizer: stop strings cut the text, and only what could still begin one is held back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor.engine.detokenizer import Detokenizer
from tests.tiny import byte_tokenizer

TOKENIZER = byte_tokenizer()
STOP = ("<tool_response>", "END")


def push_all(text: str, stop: tuple[str, ...] = STOP) -> tuple[Detokenizer, list[str]]:
    """Push `text` a byte-token at a time until a stop string matches (the engine then finishes)."""
    detok, deltas = Detokenizer(TOKENIZER, [], stop), []
    for token in TOKENIZER.encode(text, add_special_tokens=False):
        deltas.append(detok.push(token))
        if detok.stopped:
            break
    return detok, deltas


def test_text_that_cannot_begin_a_stop_string_is_released_at_once() -> None:
    _, deltas = push_all('{"q": 1}}\n</tool_call>')
    assert "".join(deltas) == '{"q": 1}}\n</tool_call>'  # "</" diverges from "<tool_response>"


def test_a_possible_start_of_a_stop_string_waits_until_it_diverges_or_matches() -> None:
    _, deltas = push_all("a <tool_res")
    assert "".join(deltas) == "a "
    _, deltas = push_all("a <tool_rex")
    assert "".join(deltas) == "a <tool_rex"
    detok, deltas = push_all("a <tool_response> b")
    assert "".join(deltas) + detok.flush() == "a " and detok.stopped


@given(st.text(alphabet="ab<tool_rspnEND> \n", max_size=40))
def test_released_text_is_the_text_cut_at_the_first_stop_string(text) -> None:
    detok, deltas = push_all(text)
    cut = min((i for s in STOP if (i := text.find(s)) >= 0), default=len(text))
    assert "".join(deltas) + detok.flush() == text[:cut]
    released = "".join(deltas)
    held = text[len(released) : cut]
    # whatever waits is a possible start of a stop string, unless the text already stopped
    assert detok.stopped or not held or any(s.startswith(held) for s in STOP)
