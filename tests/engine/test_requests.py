"""Request handling: bad input, aborts in every state, stop conditions, streaming text."""

from __future__ import annotations

import pytest

from conveyor.core.request import RequestState, SamplingParams
from tests.engine.helpers import assert_all_blocks_free, make_engine


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, num_blocks=32, block_size=4, budget=16)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", None, "prompt is empty"),
        ([], None, "prompt is empty"),
        ([1] * 200, None, "prompt has 200 tokens"),
        ([1, 2], {"max_tokens": 0}, "max_tokens must be a positive integer"),
        ([1, 2], {"max_tokens": -3}, "max_tokens must be a positive integer"),
        ([1, 2], {"temperature": -1.0}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_k": -1}, "top_k"),
        ([1, 2], {"nucleus": 0.5}, "unknown sampling parameters: nucleus"),
        ([1, 10**6], None, "token ids must be integers"),
        (42, None, "a prompt is text, chat messages or token ids"),
        ([1, 2], {"stop": 5}, "stop strings must be non-empty strings"),
        ([1, 2], {"max_tokens": True}, "max_tokens must be a positive integer"),
    ],
)
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
    waiting = engine.add_request([1] * 100, params)  # max_seqs=2: waits behind the others
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
        cut = "".join(
            o.new_text
            for o in engine.stream(
                "hello world", SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))
            )
        )
        assert cut == text[: text.index(stop)]
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


def test_resume_rejects_bad_token_ids_and_the_engine_keeps_serving(engine) -> None:
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    engine.pause_for_tool(rid)
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.resume(rid, [10**6])
    engine.resume(rid, [4, 5])
    finished = []
    while engine.has_unfinished:
        finished += [o for o in engine.step() if o.finished]
    assert [o.finish_reason for o in finished] == ["length"]
    assert_all_blocks_free(engine)


def test_tiny_temperature_is_greedy(engine) -> None:
    greedy = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_token_ids
    tiny = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-40))[0]
    assert tiny.output_token_ids == greedy


def test_stop_strings_earliest_match_wins_whatever_their_order(engine) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    text = "".join(o.new_text for o in engine.stream("abc", params))
    if len(text) < 6:
        pytest.skip("the random model produced too little text")
    late, early = text[3:6], text[1:3]
    for stop in ((late, early), (early, late)):
        cut = "".join(
            o.new_text
            for o in engine.stream("abc", SamplingParams(max_tokens=12, ignore_eos=True, stop=stop))
        )
        assert cut == text[: text.index(early)]


def test_stop_string_on_the_last_allowed_token_reports_stop(engine) -> None:
    outs = list(engine.stream("xyz", SamplingParams(max_tokens=4, ignore_eos=True)))
    text = "".join(o.new_text for o in outs)
    last = engine.tokenizer.decode(outs[-1].new_token_ids)
    if not last.strip() or not text.endswith(last):
        pytest.skip("the last token produced no text of its own")
    outs = list(engine.stream("xyz", SamplingParams(max_tokens=4, ignore_eos=True, stop=(last,))))
    assert outs[-1].finish_reason == "stop"


def test_pause_returns_held_back_text_and_stop_matching_restarts(engine) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True, stop=("@@never@@",))
    rid = engine.add_request("hello", params)
    streamed = ""
    while len(engine.get_request(rid).output_token_ids) < 5:
        streamed += "".join(o.new_text for o in engine.step() if o.request_id == rid)
    streamed += engine.pause_for_tool(rid)
    ids = engine.get_request(rid).output_token_ids
    assert streamed == engine.tokenizer.decode(ids, skip_special_tokens=True)
    engine.abort(rid)
    assert_all_blocks_free(engine)


class _FailingDetokenizer:
    """Stands in for one request's detokenizer and raises on its first token."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def push(self, token: int) -> str:
        raise RuntimeError("injected detokenizer fault")

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_a_failing_request_ends_alone_and_frees_its_blocks(engine) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    bad, good = engine.add_request([1, 2, 3], params), engine.add_request([4, 5, 6], params)
    request, detok = engine._requests[bad]
    engine._requests[bad] = (request, _FailingDetokenizer(detok))
    outputs = {}
    for _ in range(20):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert outputs[bad][-1].finish_reason == "error" and "injected" in outputs[bad][-1].error
    assert outputs[good][-1].finish_reason == "length" and outputs[good][-1].num_output_tokens == 4
    assert not engine.has_unfinished
    assert_all_blocks_free(engine)


def test_prepare_then_add_request_matches_add_request(engine) -> None:
    from conveyor.engine.engine import PreparedPrompt

    prepared = engine.prepare([5, 6, 7])
    assert isinstance(prepared, PreparedPrompt) and prepared.token_ids == [5, 6, 7]
    rid = engine.add_request(prepared, SamplingParams(max_tokens=2))
    assert engine.get_request(rid).prompt_token_ids == [5, 6, 7]
    engine.abort(rid)
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.add_request(PreparedPrompt([1], [10**6]))
    assert_all_blocks_free(engine)
