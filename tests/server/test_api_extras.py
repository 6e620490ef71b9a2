"""logprobs, n, batched prompts, GET /v1/models/{id} and unserved fields, through the official
openai client (sync and async, streamed and not) against a live server over a tiny model."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor.engine.api import Logprob, OutputLogprobs
from conveyor.server.logprobs import LegacyLogprobs
from tests.engine.helpers import hf_greedy
from tests.polling import wait_until
from tests.server.conftest import API_KEY


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def async_client(live):
    return lambda: openai.AsyncOpenAI(base_url=live[0].url + "/v1", api_key=API_KEY, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def model_log_softmax(engine, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each output position, on the server's tiny weights."""
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def ids_of(engine, token_bytes: list[bytes]) -> list[int]:
    vocab = {engine.token_bytes(i): i for i in range(engine.runner.args.vocab_size)}
    return [vocab[b] for b in token_bytes]


def settled(engine) -> bool:
    return engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished


# ---- logprobs ------------------------------------------------------------------------------
def test_chat_logprobs_are_the_models_log_softmax(client, live):
    _, engine = live
    messages = ask("hello")
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    text = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert text == out.choices[0].message.content
    ids = ids_of(engine, [bytes(e.bytes) for e in content])
    rows = model_log_softmax(engine, engine.encode(messages), ids)
    for e, token, row in zip(content, ids, rows):
        assert e.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].token == e.token  # greedy: the sampled token is the most likely


def test_chat_logprobs_streamed_sync_and_async_equal_non_streamed(client, async_client):
    args = {"model": "tiny", "messages": ask("stream me"), "max_tokens": 10, "temperature": 0}
    args |= {"logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**args).choices[0].logprobs.content

    def entries(chunks) -> list:
        return [
            e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]

    async def streamed_async() -> list:
        async with async_client() as aclient:
            return [c async for c in await aclient.chat.completions.create(**args, stream=True)]

    for chunks in (list(client.chat.completions.create(**args, stream=True)), asyncio.run(streamed_async())):
        assert [e.model_dump() for e in entries(chunks)] == [e.model_dump() for e in whole]
    plain = client.chat.completions.create(model="tiny", messages=ask("stream me"), max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client, live):
    _, engine = live
    prompt = [40, 41, 42, 43, 44, 45]
    args = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    out = client.completions.create(**args)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    ids = hf_greedy(engine.model_dir, prompt, len(lp.tokens))
    rows = model_log_softmax(engine, prompt, ids)
    assert lp.token_logprobs == pytest.approx([r[t].item() for r, t in zip(rows, ids)], abs=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value) and token in top
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    pieces = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True) if c.choices]
    assert [t for p in pieces if p for t in p.tokens] == lp.tokens
    assert [o for p in pieces if p for o in p.text_offset] == lp.text_offset
    assert [v for p in pieces if p for v in p.token_logprobs] == pytest.approx(lp.token_logprobs)


def test_text_offsets_count_characters_not_bytes():
    pieces = [b"a", "é".encode()[:1], "é".encode()[1:], b"b"]  # a byte-level tokenizer splits é
    entries = [OutputLogprobs(Logprob(i, p, -1.0)) for i, p in enumerate(pieces)]
    legacy = LegacyLogprobs(offset=3)  # after an echoed prompt of 3 characters
    assert legacy.take(entries[:2])["text_offset"] == [3, 4]
    assert legacy.take(entries[2:])["text_offset"] == [4, 5]  # é's second byte starts where é does


@pytest.mark.parametrize(
    ("route", "kwargs", "param"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": 1, "echo": True}, "echo"),
    ],
)
def test_bad_logprobs_are_400_naming_them(client, live, route, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        if route == "chat":
            client.chat.completions.create(model="tiny", messages=ask("x"), max_tokens=2, **kwargs)
        else:
            client.completions.create(model="tiny", prompt="x", max_tokens=2, **kwargs)
    assert e.value.body["param"] == param
    assert settled(live[1])


# ---- n -------------------------------------------------------------------------------------
def test_n_greedy_choices_are_equal_and_usage_counts_the_prompt_once(client):
    args = {"model": "tiny", "messages": ask("n choices"), "max_tokens": 6, "temperature": 0}
    one = client.chat.completions.create(**args)
    three = client.chat.completions.create(**args, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_n_seeded_choices_differ_and_repeat(client):
    args = {"model": "tiny", "messages": ask("seeded"), "max_tokens": 12, "temperature": 1.0, "seed": 5}
    first = [c.message.content for c in client.chat.completions.create(**args, n=4).choices]
    again = [c.message.content for c in client.chat.completions.create(**args, n=4).choices]
    assert first == again and len(set(first)) > 1
    assert client.chat.completions.create(**args).choices[0].message.content == first[0]


def test_n_streamed_chunks_carry_their_index_sync_and_async(client, async_client):
    args = {"model": "tiny", "messages": ask("n stream"), "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**args, n=3, logprobs=True)

    async def streamed_async() -> list:
        async with async_client() as aclient:
            stream = await aclient.chat.completions.create(
                **args, n=3, logprobs=True, stream=True, stream_options={"include_usage": True}
            )
            return [c async for c in stream]

    sync = list(
        client.chat.completions.create(
            **args, n=3, logprobs=True, stream=True, stream_options={"include_usage": True}
        )
    )
    for chunks in (sync, asyncio.run(streamed_async())):
        texts, reasons, logprobs = {}, {}, {}
        for c in chunks[:-1]:
            (choice,) = c.choices
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
            logprobs.setdefault(choice.index, []).extend(choice.logprobs.content if choice.logprobs else [])
        assert texts == {c.index: c.message.content for c in whole.choices}
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert {i: len(v) for i, v in logprobs.items()} == {
            c.index: len(c.logprobs.content) for c in whole.choices
        }
        usage = chunks[-1].usage  # the prompt is counted once, every choice's completion
        assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
        assert usage.completion_tokens == whole.usage.completion_tokens


def test_n_past_the_bound_is_400_naming_n(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask("x"), max_tokens=2, n=9)
    assert e.value.body["param"] == "n" and "--max-n" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=9)
    assert settled(live[1])


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_mid_way_aborts_every_choice(live, stream):
    """Two choices each run the slow tool; the client goes away: both calls are cancelled and
    both requests' blocks freed."""
    server, engine = live
    pool = engine.driver.executor.pool
    body = {"model": "tiny", "messages": ask("script:slow"), "n": 2, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=httpx.Timeout(60, read=None if stream else 2.0)) as http:
        if stream:
            with http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r:
                seen = set()
                for line in r.iter_lines():
                    if '"name": "slow"' in line:
                        seen.add(json.loads(line.removeprefix("data: "))["choices"][0]["index"])
                    if len(seen) == 2:
                        break  # both calls are out; their tools are running
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up waiting: the connection closes
                http.post(server.url + "/v1/chat/completions", json=body, headers=headers)
    assert wait_until(lambda: server.app.state.conveyor.num_pending == 0)
    assert wait_until(lambda: settled(engine))
    assert wait_until(lambda: pool.num_busy == 0)


# ---- batched prompts ------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [["abc", "hello there"], [[40, 41, 42], [50, 51, 52, 53, 54]]])
def test_batched_prompts_give_n_choices_each_in_openai_order(client, prompts):
    args = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    singles = [client.completions.create(**args, prompt=p) for p in prompts]
    batch = client.completions.create(**args, prompt=prompts, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**args, prompt=prompts, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_a_bad_prompt_in_a_batch_leaves_nothing_behind(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["fine", "x" * 5000], max_tokens=3)
    assert "tokens" in e.value.body["message"]
    assert wait_until(lambda: settled(live[1]))  # the accepted prompt was aborted
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["a"] * 33, max_tokens=1)
    assert e.value.body["param"] == "prompt"


def test_echo_repeats_the_prompt_streamed_too(client):
    args = {"model": "tiny", "prompt": "echo this", "max_tokens": 4, "temperature": 0, "echo": True}
    whole = client.completions.create(**args).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert whole.startswith("echo this") and streamed == whole


# ---- GET /v1/models/{id} --------------------------------------------------------------------
def test_models_retrieve(client, async_client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

    async def retrieve() -> str:
        async with async_client() as aclient:
            return (await aclient.models.retrieve("tiny")).owned_by

    assert asyncio.run(retrieve()) == "conveyor"


# ---- fields that are not served: 400 naming them --------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logit_bias": {"x": 10}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"extra_body": {"top_k": 3}}, "top_k"),  # OpenAI does not know it either
        ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        ({"messages": [{"role": "assistant", "content": None, "refusal": "no"}, *ask("x")]}, "messages.0"),
        (
            {"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]},
            "messages.0",
        ),
    ],
)
def test_unserved_chat_fields_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": ask("x"), "max_tokens": 2, **kwargs})
    assert e.value.body["param"] == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"suffix": "tail"}, "suffix"), ({"best_of": 3}, "best_of"), ({"prompt": [1, 2], "echo": True}, "echo")],
)
def test_unserved_completion_fields_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "tiny", "prompt": "x", "max_tokens": 2, **kwargs})
    assert e.value.body["param"] == param


def test_logit_bias_and_penalties_steer_sampling(client, live):
    _, engine = live
    forced = client.chat.completions.create(
        model="tiny", messages=ask("bias"), max_tokens=4, temperature=0, logit_bias={"50": 100}
    )
    assert forced.choices[0].message.content == (engine.token_bytes(50) * 4).decode()
    repeats = client.completions.create(
        model="tiny", prompt="bias", max_tokens=4, temperature=0, logit_bias={"50": 100}, presence_penalty=2
    )
    assert repeats.choices[0].text == (engine.token_bytes(50) * 4).decode()  # 100 outweighs 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"999999": 1})
    assert "logit_bias" in e.value.body["message"]
    assert settled(engine)


def test_no_op_values_and_identifiers_are_accepted(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=ask("x"),
        max_tokens=2,
        frequency_penalty=0,
        logit_bias={},
        store=False,
        user="u-1",
        metadata={"k": "v"},
    )
    assert out.choices[0].finish_reason in ("stop", "length")
