"""Logprobs come from the model's distribution: a log-softmax of transformers' logits on the
same weights, for greedy and sampled tokens alike; only requests that ask get them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor.core.request import SamplingParams
from tests.engine.helpers import assert_all_blocks_free, make_engine

PROMPT = [5, 17, 42, 99, 3, 64, 8]


def hf_logprobs(model_dir, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at each output position [len(output), vocab]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)


def run(engine, params: SamplingParams) -> tuple[list[int], list]:
    outputs = list(engine.stream(PROMPT, params))
    tokens = [t for o in outputs for t in o.new_token_ids]
    return tokens, [e for o in outputs for e in o.logprobs or []]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5),
        SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3, temperature=1.3, top_p=0.8, seed=7),
    ],
    ids=["greedy", "sampled"],
)
def test_logprobs_equal_transformers_log_softmax(tiny_qwen2, params):
    engine = make_engine(tiny_qwen2, budget=4)  # chunked prefill: the logits row is the last chunk's
    tokens, entries = run(engine, params)
    expected = hf_logprobs(tiny_qwen2, PROMPT, tokens)
    assert [e.chosen.token_id for e in entries] == tokens
    for e, row in zip(entries, expected):
        assert e.chosen.logprob == pytest.approx(row[e.chosen.token_id].item(), abs=1e-4)
        top = [t.logprob for t in e.top]
        assert len(top) == params.logprobs and top == sorted(top, reverse=True)
        assert top == pytest.approx(row.topk(params.logprobs).values.tolist(), abs=1e-4)
        assert all(t.token == engine.token_bytes(t.token_id) for t in e.top)
        if params.greedy:
            assert e.top[0].token_id == e.chosen.token_id
    assert_all_blocks_free(engine)


def test_token_bytes_are_the_tokens_bytes(tiny_qwen2):
    engine = make_engine(tiny_qwen2)
    ids = engine.tokenizer.encode("é€!", add_special_tokens=False)  # one token per byte
    assert b"".join(engine.token_bytes(i) for i in ids) == "é€!".encode()


def test_no_logprobs_unless_asked_and_none_for_the_stop_token(tiny_qwen2):
    engine = make_engine(tiny_qwen2)
    outputs = list(engine.stream(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)))
    assert all(o.logprobs is None for o in outputs)
    first = outputs[0].new_token_ids[0]
    # the greedy first token made a stop token: it ends the text, so it has no logprobs entry
    stopped = list(engine.stream(PROMPT, SamplingParams(max_tokens=6, logprobs=0, stop_token_ids=(first,))))
    assert stopped[-1].new_token_ids == [first] and stopped[-1].finish_reason == "stop"
    assert [e for o in stopped for e in o.logprobs] == []
    assert_all_blocks_free(engine)


def test_logprobs_is_bounded():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
