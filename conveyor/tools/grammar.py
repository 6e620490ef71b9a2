"""Constrained tool calls: xgrammar grammars for the Qwen/Hermes call format.

A call is `<tool_call>\\n{"name": "<tool>", "arguments": <JSON>}\\n</tool_call>`, where the
name is one of the request's tools and the arguments fit that tool's parameters schema.
xgrammar's built-in "qwen_3" structural tag is exactly this format (Qwen2.5 shares it),
so it is used as is for "auto" (free text, and a constrained call after each
`<tool_call>` trigger) and for a named tool (exactly one call of it). For "required" the
built-in allows free text after the first call; here the reply is calls only, separated
by newlines, and may end after the first. Where a request's parser also reads JSON calls in
```json fences and bare JSON (`lenient`), "auto" constrains those too: a ```json fence, and
`{"name": ` anywhere in the text, can only go on as a call of an offered tool (so under
lenient calls a ```json fence holds a call, never other JSON; ```JSON and ```tool_call
fences, which the parser also reads, are not constrained).

A `ToolGrammar` belongs to one tokenizer and compiles each (tools, choice) once; a
`Constraint` is one model turn's matcher, which the runner uses to mask logits. The same
machinery constrains structured outputs (`json_constraint`: the reply is one JSON value that
fits a schema, `response_format` in the API).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import xgrammar as xgr
from xgrammar.structural_tag import (
    AnyTextFormat,
    JSONSchemaFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from conveyor.tools.grammar_compile import BoundedCompiler

log = logging.getLogger(__name__)

ToolChoice = str | dict[str, Any]
CALL_FORMAT = "qwen_3"  # xgrammar's built-in structural tag for Hermes-style <tool_call> JSON
CALL_START = "<tool_call>"  # what a Hermes call starts with: never written under tool_choice "none"
CALL_SEPARATOR = "\n"  # between calls of a "required" reply, as the Qwen chat template joins them
FENCE_START, FENCE_END = "```json\n", "\n```"  # a fenced call, as the lenient parser reads it
BARE_START = '{"name": '  # a bare JSON call (also how a tagged call's object starts)
MAX_SPARSE_WORDS = 1024  # masked_argmax: bitmask words read one by one (up to 32,768 allowed ids)
TOP_CANDIDATES = 16  # masked_argmax, many allowed: the highest logits tried


class Constraint:
    """One model turn's grammar state (an xgrammar GrammarMatcher).

    The sampler first offers its unmasked choice to `try_accept`; only when that refuses
    does `fill_mask` write the allowed next tokens into a bitmask row, and `accept` advance
    by the token drawn from the masked row. A token `accept` rejects (it can only come from
    unmasked logits) is logged and ends the constraint: the rest of the turn is
    unconstrained, and the engine carries on.
    """

    __slots__ = ("_failed", "_matcher", "_row", "_vocab_size")

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._failed = False
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self._row: Any = None  # a one-row bitmask for `masked_argmax`, made on first use

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the turn is complete."""
        return self._matcher.is_terminated()

    @property
    def active(self) -> bool:
        """Whether the next token is masked: neither terminated nor given up after a rejection."""
        return not self._failed and not self._matcher.is_terminated()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an `xgrammar.allocate_token_bitmask`."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def masked_argmax(self, row_logits: torch.Tensor, num_top: int = TOP_CANDIDATES) -> int | None:
        """The token greedy decoding picks from `row_logits` [vocab] once masked, without masking
        the row (~1 ms on a CPU), or None where that is not cheaper. One bitmask row is filled
        (5-35 µs); where few words of it are set (a structural position: a key, a brace) the
        allowed ids are read from those words alone and the best is taken among them (exact,
        ties to the lowest id as in a masked argmax); where many are (inside a string) the
        best allowed of the `num_top` highest logits, if one is above the lowest of them."""
        if self._row is None:
            self._row = xgr.allocate_token_bitmask(1, self._vocab_size)
        self._matcher.fill_next_token_bitmask(self._row, 0)
        words = self._row[0].numpy()
        nonzero = np.flatnonzero(words)
        if len(nonzero) == 0:
            return None
        if len(nonzero) <= MAX_SPARSE_WORDS:
            bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(len(nonzero), 32)
            allowed = (nonzero[:, None] * 32 + np.arange(32))[bits.astype(bool)]
            allowed = allowed[allowed < row_logits.shape[-1]]
            if len(allowed) == 0:
                return None
            return int(allowed[int(row_logits[torch.from_numpy(allowed)].argmax())])
        values, top = row_logits.topk(min(num_top, row_logits.shape[-1]))
        allowed = [
            (v, -t) for v, t in zip(values.tolist(), top.tolist()) if (int(words[t >> 5]) >> (t & 31)) & 1
        ]
        if not allowed or max(allowed)[0] == values[-1]:
            return None  # none allowed, or a tie that may go on past the cut
        return -max(allowed)[1]

    def try_accept(self, token: int) -> bool:
        """Advance past `token` if the grammar allows it; otherwise change nothing, return False."""
        return self._matcher.accept_token(token)

    def accept(self, token: int) -> None:
        """Advance past `token`; a rejected token ends the constraint (see the class docstring)."""
        if self.active and not self._matcher.accept_token(token):
            log.warning("tool-call grammar rejected token %d; the rest of the turn is unconstrained", token)
            self._failed = True


class ToolGrammar:
    """Compiles tool-call grammars for one tokenizer; caches compiled grammars by (tools, choice).

    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's);
    `stop_token_ids` end a turn (the engine's `eos_token_ids`) and are allowed wherever
    the grammar may end. `max_whitespace` caps runs of whitespace inside arguments, so a
    sampled call cannot stall in endless blanks. `compile_timeout_s` > 0 compiles in a helper
    process that is killed past it (`grammar_compile.py`); 0 compiles on the calling thread.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int] | None = None,
        *,
        max_whitespace: int | None = 16,
        max_cached: int = 64,
        compile_timeout_s: float = 0.0,
    ) -> None:
        stops = sorted(stop_token_ids) if stop_token_ids is not None else None
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size = vocab_size
        self.max_whitespace = max_whitespace
        self._compiler: Any = xgr.GrammarCompiler(info, cache_enabled=False)
        if compile_timeout_s > 0:  # compiles in a helper process, killed past the timeout
            self._compiler = BoundedCompiler(info, compile_timeout_s)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()  # the cache is shared by the engine and its preparation threads

    def constraint(
        self, tools: list[dict[str, Any]] | None, tool_choice: ToolChoice = "auto", lenient: bool = False
    ) -> Constraint | None:
        """A fresh matcher for one turn, or None when nothing is constrained ("none", no tools).

        `tools` are OpenAI tool specs; `tool_choice` is "auto", "required", "none" or
        `{"type": "function", "function": {"name": ...}}`; `lenient`: "auto" constrains fenced
        and bare JSON calls too. Raises ValueError for a choice that names no given tool or a
        schema xgrammar cannot compile.
        """
        if tool_choice == "none" or not tools:
            return None
        return Constraint(self.compiled(tools, tool_choice, lenient))

    def no_call_constraint(self) -> Constraint:
        """A fresh matcher for free text that never opens a call (tool_choice "none" while the
        tools stay listed in the prompt)."""
        tag = StructuralTag(format=AnyTextFormat(excludes=[CALL_START]))
        return Constraint(self._compiled("no-calls", tag, "a no-call"))

    def json_constraint(self, schema: dict[str, Any]) -> Constraint:
        """A fresh matcher for a reply that is one JSON value fitting `schema` (where a schema
        declares properties, no others; see `conveyor.tools.json_schema` for the keywords
        enforced). Raises ValueError for a schema xgrammar cannot compile."""
        tag = StructuralTag(
            format=JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=self.max_whitespace)
        )
        return Constraint(self._compiled(json.dumps(["json", schema], sort_keys=True), tag, "an output"))

    def compiled(
        self, tools: list[dict[str, Any]], tool_choice: ToolChoice, lenient: bool = False
    ) -> xgr.CompiledGrammar:
        """The compiled grammar of (tools, choice), from the cache when it was compiled before."""
        lenient = lenient and tool_choice == "auto"  # the other choices write tagged calls only
        key = json.dumps([tools, tool_choice, lenient], sort_keys=True)
        tag = lambda: structural_tag(tools, tool_choice, self.max_whitespace, lenient)
        return self._compiled(key, tag, "a tool-call")

    def _compiled(self, key: str, tag: Any, what: str) -> xgr.CompiledGrammar:
        """From the cache, or compiled from `tag` (a StructuralTag or a function making one)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            compiled = self._compiler.compile_structural_tag(tag() if callable(tag) else tag)
        except (RuntimeError, TimeoutError) as e:  # xgrammar reports unsupported schemas as RuntimeError
            raise ValueError(f"cannot build {what} grammar: {e}") from e
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled


def structural_tag(
    tools: list[dict[str, Any]],
    tool_choice: ToolChoice,
    max_whitespace: int | None = 16,
    lenient: bool = False,
) -> StructuralTag:
    """The xgrammar structural tag of one (tools, choice), also sent as is to a remote engine
    that compiles structural tags with xgrammar (vLLM); see the module docstring."""
    tag = xgr.get_model_structural_tag(
        CALL_FORMAT,
        tools=tools,
        tool_choice=tool_choice,
        reasoning="disabled",
        exclude_special_tokens=False,
        max_whitespace_cnt=max_whitespace,
    )
    if tool_choice == "required":
        calls = TagsWithSeparatorFormat(tags=tag.format.tags, separator=CALL_SEPARATOR, at_least_one=True)
        tag = StructuralTag(format=calls)
    elif lenient and tool_choice == "auto":
        tag = _with_untagged_calls(tag)
    return tag


def _with_untagged_calls(tag: StructuralTag) -> StructuralTag:
    """ "auto" under a lenient parser: each tool's tagged call also as a ```json fence and as bare
    JSON, triggered by the fence's opening and by `{"name": `."""
    tagged = tag.format.tags
    bodies = [(t.begin.removeprefix(CALL_START).lstrip("\n"), t.content) for t in tagged]
    fenced = [
        TagFormat(begin=FENCE_START + begin, content=content, end="}" + FENCE_END)
        for begin, content in bodies
    ]
    bare = [TagFormat(begin=begin, content=content, end="}") for begin, content in bodies]
    triggers = [*tag.format.triggers, FENCE_START.rstrip("\n"), BARE_START]
    return StructuralTag(format=TriggeredTagsFormat(triggers=triggers, tags=[*tagged, *fenced, *bare]))
