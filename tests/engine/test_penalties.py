"""OpenAI's logit_bias, frequency_penalty and presence_penalty: greedy decoding with them equals
greedy decoding of transformers' logits adjusted by OpenAI's formula; rows that set none are
untouched; logprobs stay the model's own."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor.core.request import SamplingParams
from conveyor.engine.sampler import adjust_logits
from tests.engine.helpers import assert_all_blocks_free, make_engine

PROMPT = [5, 17, 42, 99, 3, 64, 8]


def hf_adjusted_greedy(model_dir, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + output])).logits[0, -1].clone()
            for token, bias in params.logit_bias:
                logits[token] += bias
            for token in set(output):
                count = output.count(token)
                logits[token] -= count * params.frequency_penalty + params.presence_penalty
            output.append(int(logits.argmax()))
    return output


@pytest.mark.parametrize(
    "adjust",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0, "frequency_penalty": -0.5},
        {"logit_bias": {50: 12.0, 114: -100.0}, "presence_penalty": 1.0},  # 114: the first greedy token
    ],
)
def test_greedy_with_penalties_equals_the_adjusted_reference(tiny_qwen2, adjust):
    params = SamplingParams(max_tokens=12, ignore_eos=True, **adjust)
    engine = make_engine(tiny_qwen2)
    (request,) = engine.generate([PROMPT], params)
    assert request.output_token_ids == hf_adjusted_greedy(tiny_qwen2, PROMPT, 12, params)
    plain = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert plain.output_token_ids != request.output_token_ids  # the adjustment did something
    assert_all_blocks_free(engine)


def test_only_rows_that_set_them_change():
    logits = torch.zeros(3, 8)
    params = [SamplingParams(), SamplingParams(logit_bias={2: 5.0}), SamplingParams(frequency_penalty=1.0)]
    adjust_logits(logits, params, [[1, 1], [2], [3, 3, 4]])
    assert logits[0].tolist() == [0.0] * 8
    assert logits[1].tolist() == [0, 0, 5, 0, 0, 0, 0, 0]
    assert logits[2].tolist() == [0, 0, 0, -2, -1, 0, 0, 0]


def test_a_bias_outside_the_vocabulary_is_refused(tiny_qwen2):
    engine = make_engine(tiny_qwen2)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))
    assert not engine.has_unfinished
