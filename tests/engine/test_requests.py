"""Request handling: bad input, aborts in every state, stop conditions, streaming text."""
from __future__ import annotations

import pytest

from conveyor.engine.request import RequestState, SamplingParams
from tests.engine.helpers import assert_all_blocks_free, make_engine


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, num_blocks=32, block_size=4, budget=16)


@pytest.mark.parametrize("prompt, params, message", [
    ("", None, "prompt is empty"),
    ([], None, "prompt is empty"),
    ([1] * 200, None, "prompt has 200 tokens"),
    ([1, 2], {"max_tokens": 0}, "max_tokens must be a positive integer"),
    ([1, 2], {"max_tokens": -3}, "max_tokens must be a positive integer"),
    ([1, 2], {"temperature": -1.0}, "temperature"),
    ([1, 2], {"top_p": 0.0}, "top_p"),
    ([1, 2], {"top_k": -1}, "top_k"),
    ([1, 2], {"nucleus": 0.5}, "unknown sampling parameters: nucleus"),
    ([1, 10**6], None, "prompt token ids"),
])
def test_bad_input_is_a_clear_error_and_allocates_nothing(engine, prompt, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished
    assert_all_blocks_free(engine)


def test_duplicate_request_id(engine) -> None:
    engine.add_request([1, 2], request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([3], request_id="dup")
    engine.abort("dup")
    assert_all_blocks_free(engine)


def test_abort_in_every_state_frees_blocks(tiny_llama) -> None:
    engine = make_engine(tiny_llama, num_blocks=32, block_size=4, budget=16, max_seqs=2)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    running = engine.add_request([2] * 10, params)
    paused = engine.add_request([3] * 10, params)
    waiting = engine.add_request([1] * 100, params)         # max_seqs=2: waits behind the others
    engine.step()
    engine.step()
    engine.pause_for_tool(paused)
    states = {rid: engine.get_request(rid).state for rid in (waiting, running, paused)}
    assert states[paused] is RequestState.AWAITING_TOOL
    assert RequestState.RUNNING in states.values()
    for rid in (waiting, running, paused):
        out = engine.abort(rid)
        assert out.finished and out.finish_reason == "abort"
    assert engine.abort(running) is None
    assert_all_blocks_free(engine)


def test_max_tokens_ends_with_length(engine) -> None:
    [r] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(r.output_token_ids) == 3 and r.finish_reason == "length"


def test_stop_token_id_ends_with_stop(engine) -> None:
    [probe] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    stop = probe.output_token_ids[2]
    [r] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=(stop,)))
    assert r.finish_reason == "stop" and r.output_token_ids[-1] == stop
    assert len(r.output_token_ids) == probe.output_token_ids.index(stop) + 1


def test_stream_text_concatenates_and_stop_string_cuts(engine) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = list(engine.stream("hello world", params))
    text = "".join(o.new_text for o in outs)
    assert outs[-1].finished and outs[-1].num_output_tokens == 12
    assert text == engine.tokenizer.decode(engine_output_ids(outs), skip_special_tokens=True)
    if len(text) >= 4:
        stop = text[2:4]
        cut = "".join(o.new_text for o in engine.stream("hello world", SamplingParams(max_tokens=12, ignore_eos=True,
                                                                                        stop=(stop,))))
        assert cut == text[:text.index(stop)]
    assert_all_blocks_free(engine)


def engine_output_ids(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_seeded_sampling_is_reproducible(engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = engine.generate([[9, 8, 7]], params)[0].output_token_ids
    b, _ = engine.generate([[9, 8, 7], [1, 2, 3, 4]], params)
    assert a == b.output_token_ids


def test_chat_messages_use_the_chat_template(engine) -> None:
    ids = engine.encode([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
