"""One request's conversation with the remote engine, and the output it yields.

Each model turn is one streamed `/v1/completions` request whose prompt is the conversation
so far: the first prompt, then each turn's raw text exactly as streamed, then the rendered
tool-result turn. A turn may be forced to start with some text (`forced`, already at the end
of the prompt) and get some text added after a clean stop (`closing`); see constraints.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.backends.constraints import TurnForm
from conveyor.core.request import SamplingParams
from conveyor.engine.api import ContinuedChat, PreparedPrompt, Prompt, RequestOutput, non_empty, render_prompt

if TYPE_CHECKING:
    from conveyor.backends.stream import RemoteStream


def prompt_text(tokenizer: Any, prompt: Prompt, tools: list[dict] | None = None) -> str:
    """The prompt text: text as is, chat messages through the chat template, token ids decoded."""
    if isinstance(prompt, PreparedPrompt):
        return non_empty(prompt.text)
    if isinstance(prompt, ContinuedChat):  # no tokens of ours to reuse: the remote engine renders it all
        prompt = prompt.messages
    rendered = render_prompt(tokenizer, prompt, tools)
    if isinstance(rendered, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in rendered):
            raise ValueError("a prompt is text, chat messages or token ids, not list")
        rendered = tokenizer.decode(rendered)
    return non_empty(rendered)


def refuse_unserved(params: SamplingParams, json_schema: dict | None) -> None:
    """ValueError, before anything is sent, for what a remote backend does not serve."""
    if params.logprobs is not None:
        raise ValueError("logprobs: the embedded engine computes them; a remote backend does not serve them")
    if json_schema is not None:  # not sent on: the remote engine would not be held to it
        raise ValueError(
            "response_format (a JSON schema for the reply) is not served with a remote backend yet"
        )


@dataclass(slots=True)
class RemoteOutput(RequestOutput):
    """A RequestOutput with the prompt tokens the remote engine computed over all turns (the
    rest came from its prefix cache). `new_token_ids` stays empty: the remote stream carries text."""

    num_prefill_tokens: int = 0


@dataclass(slots=True)
class RemoteRequest:
    """One request's conversation with the remote engine."""

    request_id: str
    prompt: str  # the conversation so far, the model's raw output included
    params: SamplingParams
    num_prompt_tokens: int
    turn: int = 0
    forced: str = ""  # text the turn was started with (the prompt ends with it), not yet shown
    closing: str = ""  # text added to the turn after a clean stop (constraints.TurnForm)
    turn_text: list[str] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)
    stream: RemoteStream | None = None
    num_output_tokens: int = 0
    num_turn_tokens: int = 0  # output tokens of the turns before this one
    num_cached_tokens: int = 0  # prompt tokens the remote engine found in its prefix cache, all turns
    num_prefill_tokens: int = 0  # prompt tokens it had to compute, all turns
    turn_usage: list[dict[str, Any]] = field(default_factory=list)  # the remote's usage report per turn
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.output_text)

    def body(self, model: str, form: TurnForm) -> dict[str, Any]:
        """The next turn's streamed completion request; the turn starts with `form.opening`."""
        self.forced, self.closing = form.opening, form.closing
        return {
            "model": model,
            "prompt": self.prompt + form.opening,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling_fields(),
            **form.fields,
        }

    def take(self, text: str) -> str:
        """New text of the turn (after the forced opening, shown with the first text)."""
        if self.forced:
            text, self.forced = self.forced + text, ""
        self.turn_text.append(text)
        self.output_text.append(text)
        self.num_output_tokens += 1  # one streamed chunk per token; usage corrects it at the end
        return text

    def end_turn(self, usage: dict[str, Any]) -> None:
        """The turn's text joins the prompt; token counts from the remote engine's usage report,
        where it sends one."""
        self.prompt += "".join(self.turn_text)
        self.turn_text = []
        self.turn_usage.append(usage)
        if "completion_tokens" in usage:
            self.num_output_tokens = self.num_turn_tokens + int(usage["completion_tokens"])
        self.num_turn_tokens = self.num_output_tokens
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.num_cached_tokens += cached
        self.num_prefill_tokens += max(0, int(usage.get("prompt_tokens", 0)) - cached)

    def cut(self) -> None:
        """A rejected call cut the turn off: the remote engine stops decoding it at once."""
        self.close_stream()
        self.prompt += self.forced + "".join(self.turn_text)
        self.forced, self.turn_text = "", []
        self.num_turn_tokens = self.num_output_tokens

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def output(self, text: str, results: list | None = None, timeline: list | None = None) -> RemoteOutput:
        return RemoteOutput(
            self.request_id,
            [],
            text,
            self.finished,
            self.finish_reason,
            self.num_prompt_tokens,
            self.num_output_tokens,
            results or [],
            timeline,
            self.num_cached_tokens,
            self.error,
            num_prefill_tokens=self.num_prefill_tokens,
        )

    def _sampling_fields(self) -> dict[str, Any]:
        """The sampling parameters as OpenAI fields (plus the vLLM / llama.cpp extensions top_k,
        ignore_eos and stop_token_ids, sent only when set)."""
        p = self.params
        body: dict[str, Any] = {
            "max_tokens": max(1, p.max_tokens - self.num_output_tokens),
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        extras = {
            "top_k": p.top_k or None,
            "seed": p.seed,
            "stop": list(p.stop) or None,
            "ignore_eos": p.ignore_eos or None,
            "stop_token_ids": list(p.stop_token_ids) or None,
            # the remote engine counts penalties over its turn's output only (a turn is a new completion)
            "frequency_penalty": p.frequency_penalty or None,
            "presence_penalty": p.presence_penalty or None,
            "logit_bias": {str(t): b for t, b in p.logit_bias} or None,
        }
        body.update({k: v for k, v in extras.items() if v is not None})
        return body
