"""core/sessions.py: the follow-up text, the bounded token index, and session KV kept across a
client's tool time (TTL, pressure, hand-over), with a property test for block leaks."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.config import SchedulerConfig, cache_root
from conveyor.core.block_manager import BlockManager
from conveyor.core.request import FinishCause, Request, RequestState, SamplingParams
from conveyor.core.scheduler import Scheduler
from conveyor.core.sessions import TokenIndex, conversation_keys, follow_up_text
from tests.tiny import byte_tokenizer

EOS = 0
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    {"role": "tool", "tool_call_id": "c2", "content": "23C"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def renderer(tokenizer):
    return lambda messages, generation_prompt: tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=generation_prompt, tokenize=False
    )


# ---- the follow-up text -------------------------------------------------------------------
def test_the_tiny_template_continues_after_the_end_of_turn_token() -> None:
    text = follow_up_text(renderer(byte_tokenizer()), CONVERSATION, 2, "<|im_end|>")
    assert (
        text == "\n<|im_start|>tool\n22C<|im_end|>\n<|im_start|>tool\n23C<|im_end|>\n<|im_start|>assistant\n"
    )


def _default_model_dir() -> Path | None:
    found = sorted((cache_root() / "models").glob("qwen2.5-coder-0.5b-*/chat_template.jinja"))
    return found[0].parent if found else None


@pytest.mark.skipif(_default_model_dir() is None, reason="the default model is not installed here")
def test_the_default_models_template_groups_tool_results_after_the_call() -> None:
    from transformers import AutoTokenizer

    render = renderer(AutoTokenizer.from_pretrained(_default_model_dir()))
    text = follow_up_text(render, CONVERSATION, 2, "<|im_end|>")
    assert text == (
        "\n<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n23C\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    later = [*CONVERSATION, {"role": "assistant", "content": "22C."}, {"role": "user", "content": "Rome?"}]
    assert follow_up_text(render, later, 5, "<|im_end|>") == (
        "\n<|im_start|>user\nRome?<|im_end|>\n<|im_start|>assistant\n"
    )


TEXT = st.text(alphabet='abc xyz\n{}"', max_size=12)
LATER = st.lists(
    st.one_of(
        st.builds(lambda t: {"role": "tool", "tool_call_id": "c1", "content": t}, TEXT),
        st.builds(lambda t: {"role": "user", "content": t}, TEXT),
        st.builds(lambda t: {"role": "assistant", "content": t}, TEXT),
    ),
    min_size=1,
    max_size=4,
)


@cache
def _templates() -> list:
    found = [byte_tokenizer()]
    if _default_model_dir() is not None:
        from transformers import AutoTokenizer

        found.append(AutoTokenizer.from_pretrained(_default_model_dir()))
    return found


@settings(max_examples=60, deadline=None)
@given(TEXT, st.booleans(), LATER)
def test_the_reused_turn_and_the_follow_up_text_make_the_whole_rendering(content, calls, later) -> None:
    """Where the model wrote exactly what the template prints for its turn, the reused text and
    the follow-up text are the whole conversation's rendering: nothing lost, nothing doubled."""
    reply = {"role": "assistant", "content": content, **({"tool_calls": [CALL]} if calls else {})}
    messages = [{"role": "user", "content": "Weather?"}, reply, *later]
    for tokenizer in _templates():
        render = renderer(tokenizer)
        head = render(messages[:2], False)
        model_wrote = head[: head.rfind("<|im_end|>") + len("<|im_end|>")]
        assert model_wrote + follow_up_text(render, messages, 2, "<|im_end|>") == render(messages, True)


def test_templates_that_would_give_a_wrong_prefix_are_refused() -> None:
    def marks_the_last(messages, generation_prompt):  # renders the last message differently
        return "".join(
            f"[{m['role']}{'*' if i == len(messages) - 1 else ''}]" for i, m in enumerate(messages)
        )

    with pytest.raises(ValueError, match="differently"):
        follow_up_text(marks_the_last, CONVERSATION, 2, "]")
    render = renderer(byte_tokenizer())
    with pytest.raises(ValueError, match="did not generate"):  # the model's stop token is not the turn's end
        follow_up_text(render, CONVERSATION, 2, "<|endoftext|>")
    with pytest.raises(ValueError):
        follow_up_text(render, CONVERSATION, 4, "<|im_end|>")  # nothing after the reused messages


def test_keys_tell_every_part_apart() -> None:
    keys = conversation_keys("m", TOOLS, CONVERSATION)
    edited = [*CONVERSATION[:1], {**CONVERSATION[1], "tool_calls": [{**CALL, "id": "c9"}]}]
    assert (
        conversation_keys("m", TOOLS, edited)[0] == keys[0]
        and conversation_keys("m", TOOLS, edited)[1] != keys[1]
    )
    assert conversation_keys("other", TOOLS, CONVERSATION)[1] != keys[1]
    assert conversation_keys("m", [], CONVERSATION)[1] != keys[1]
    reordered = {**CALL, "function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}
    ordered = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}
    assert conversation_keys("m", [], [reordered]) != conversation_keys("m", [], [ordered])


# ---- the token index ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "wait"]), st.integers(0, 5), st.integers(0, 300)),
        max_size=60,
    ),
    st.integers(1, 4),
    st.integers(300, 3000),
)
def test_the_index_stays_within_its_bounds(ops, max_entries, max_bytes) -> None:
    clock = Clock()
    index = TokenIndex(max_entries, max_bytes, ttl_s=10.0, clock=clock)
    last: dict[bytes, list[int]] = {}
    for op, k, n in ops:
        key = bytes([k]) * 32
        if op == "put":
            if index.put(key, list(range(n)), f"r{k}"):
                last[key] = list(range(n))
        elif op == "get":
            entry = index.get(key)
            assert entry is None or (entry.token_ids.tolist() == last[key] and entry.source_id == f"r{k}")
        else:
            clock.now += n / 30
        assert len(index) <= max_entries and index.num_bytes <= max_bytes
        assert index.num_bytes == sum(e.num_bytes + len(k) for k, e in index._entries.items())
    clock.now += 11
    assert all(index.get(bytes([k]) * 32) is None for k in range(6)) and index.num_bytes == 0


# ---- session KV -----------------------------------------------------------------------------
def make(
    num_blocks: int = 16,
    ttl_factor: float = 2.0,
    max_ttl_s: float = 60.0,
    clock=None,
    intercept: str = "preserve",
) -> Scheduler:
    config = SchedulerConfig(
        intercept=intercept,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        default_tool_s=1.0,
        session_ttl_factor=ttl_factor,
        session_max_ttl_s=max_ttl_s,
    )
    return Scheduler(config, BlockManager(num_blocks, 4), 64, clock=clock or Clock())


def agent_request(
    rid: str, token_ids: list[int], continues: str | None = None, max_tokens: int = 8
) -> Request:
    request = Request(rid, token_ids, SamplingParams(max_tokens=max_tokens), stop_token_ids=frozenset({EOS}))
    request.client_tools, request.continues = object(), continues  # offers the client's tools
    return request


def finish_with_call(s: Scheduler, request: Request, tokens: list[int]) -> None:
    """Run `request` to its end, sampling `tokens` (the last one the stop token)."""
    s.add(request)
    for token in tokens:
        out = s.schedule()
        s.postprocess(out, [token if c.sample else None for c in out.chunks])
    assert request.finished and request.finish_cause is FinishCause.STOP_TOKEN


def test_the_follow_up_takes_the_kept_kv_over_and_prefills_only_its_new_tokens() -> None:
    s = make()
    first = agent_request("a", list(range(1, 10)))
    finish_with_call(s, first, [11, 12, EOS])
    assert "a" in s.sessions.retained and len(first.block_table) == 3
    follow = agent_request("b", [*first.token_ids, 21, 22, 23], continues="a")
    s.add(follow)
    out = s.schedule()
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 11, 4)]
    assert not s.sessions.retained and s.tool_times.expected_s(None) == 0.0  # its wait was recorded


def test_past_its_ttl_the_kv_goes_back_to_the_prefix_cache() -> None:
    clock = Clock()
    s = make(clock=clock)
    first = agent_request("a", list(range(1, 10)))
    finish_with_call(s, first, [11, 12, EOS])
    blocks = list(first.block_table)
    clock.now += 1.9  # TTL: 2 x the expected 1 s
    s.schedule()
    assert "a" in s.sessions.retained
    clock.now += 0.2
    s.schedule()
    assert not s.sessions.retained and s.block_manager.num_used_blocks == 0
    # its full blocks are still adoptable: a late follow-up finds them through their hashes
    assert s.block_manager.lookup_prefix([*range(1, 10), 11, 12, EOS, 5]) == blocks[:2]  # 8 of 11 computed


def test_a_follow_up_after_the_ttl_still_times_the_clients_tool() -> None:
    clock = Clock()
    s = make(clock=clock)
    first = agent_request("a", list(range(1, 10)))
    finish_with_call(s, first, [11, 12, EOS])
    first.tool = "search"  # as the engine names it once it has read the turn's calls
    clock.now += 5.0
    s.schedule()
    assert not s.sessions.retained
    s.add(agent_request("b", [*first.token_ids, 21], continues="a"))
    s.schedule()
    assert s.tool_times.expected_s("search") == 5.0  # so the next TTL is 10 s, not 2


def test_under_pressure_a_kept_session_gives_way_to_queued_work() -> None:
    s = make(num_blocks=4)
    first = agent_request("a", list(range(1, 10)))
    finish_with_call(s, first, [11, 12, EOS])
    other = agent_request("x", list(range(30, 41)))  # needs all four blocks
    s.add(other)
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["x"] and not s.sessions.retained


def test_a_request_short_of_blocks_takes_a_kept_sessions_blocks_even_where_keeping_wastes_less() -> None:
    s = make(num_blocks=4, max_ttl_s=60.0)
    first = agent_request("a", list(range(1, 10)))
    first.client_tool_s = 1e-3  # back at once, so least waste would keep it (recompute costs more)
    finish_with_call(s, first, [11, 12, EOS])
    wastes = s.sessions._waste(first, 0)
    assert wastes.preserve < wastes.discard
    s.add(agent_request("x", list(range(30, 41))))
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["x"] and not s.sessions.retained


def test_turns_without_client_calls_or_with_sessions_off_keep_nothing() -> None:
    s = make()
    plain = Request("p", [1, 2, 3], SamplingParams(max_tokens=4), stop_token_ids=frozenset({EOS}))
    finish_with_call(s, plain, [EOS])
    off = Scheduler(SchedulerConfig(session_kv=False), BlockManager(16, 4), 64)
    finish_with_call(off, agent_request("a", [1, 2, 3]), [EOS])
    assert not s.sessions.retained and not off.sessions.retained
    assert s.block_manager.num_used_blocks == 0 and off.block_manager.num_used_blocks == 0


def _held(s: Scheduler, requests: list[Request]) -> int:
    return sum(len(r.block_table) for r in requests)


OPS = ["new", "follow", "follow", "step", "step", "step", "step", "abort", "wait"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 7), st.integers(1, 9)), max_size=80),
    st.integers(4, 40),
    st.sampled_from(["preserve", "discard", "auto"]),
)
def test_no_block_leaks_under_sessions_aborts_and_expiries(ops, num_blocks, policy) -> None:
    clock = Clock()
    s = make(num_blocks=num_blocks, clock=clock, intercept=policy)
    bm, live, ids = s.block_manager, [], iter(range(10**6))
    for op, k, n in ops:
        if op == "new":
            live.append(agent_request(f"r{next(ids)}", [k + 1] * n, max_tokens=9))
            s.add(live[-1])
        elif op == "follow" and s.sessions.retained:
            source = list(s.sessions.retained.values())[k % len(s.sessions.retained)]
            prompt = [*source.token_ids, *[k + 1] * n][: s.max_model_len - 1]
            live.append(agent_request(f"r{next(ids)}", prompt, continues=source.request_id, max_tokens=n))
            s.add(live[-1])
        elif op == "step":
            out = s.schedule()
            s.postprocess(out, [EOS if (c.request.num_tokens + k) % 2 == 0 else k + 1 for c in out.chunks])
        elif op == "abort" and live:
            s.finish(live[k % len(live)], FinishCause.ABORT)
        elif op == "wait":
            clock.now += n / 6  # past the TTL (2 s) after a few
        live = [r for r in live if not r.finished]
        kept = list(s.sessions.retained.values())
        assert all(r.state is RequestState.FINISHED and r.block_table for r in kept)
        assert sum(b.ref_count for b in bm.blocks) == _held(s, live + kept)
        assert bm.num_free_blocks + len({b for r in live + kept for b in r.block_table}) == num_blocks
    for request in live:
        s.finish(request, FinishCause.ABORT)
    clock.now += 1000
    s.schedule()
    assert not s.sessions.retained and bm.num_used_blocks == 0 and all(b.ref_count == 0 for b in bm.blocks)
