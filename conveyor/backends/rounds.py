"""Tool rounds of the remote backend: the same ToolLoop, parsers, executor and workers as the
embedded engine, driven by streamed text instead of sampled tokens.

A turn's text feeds the request's Turn as it arrives (partial or lazy mode, the same safety
rules: external tools run only after a clean end, never on length, abort, error or a rejection).
A clean end with calls waits for the results, then the next turn is a new remote request whose
prompt is the previous one plus the turn's raw text plus the rendered tool-result turn. A
rejected field closes the remote stream at once. `RemoteRounds` is mixed into RemoteEngine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.backends.constraints import TurnForm, remote_form
from conveyor.engine.request import SamplingParams
from conveyor.engine.tool_loop import Span, ToolOptions
from conveyor.engine.tool_rounds import BODY_FORMATS, ToolRounds
from conveyor.tools.base import ToolResult

if TYPE_CHECKING:
    from conveyor.backends.remote import RemoteOutput
    from conveyor.backends.stream import RemoteStream


@dataclass(slots=True)
class RemoteRequest:
    """One request's conversation with the remote engine."""

    request_id: str
    prompt: str                  # the conversation so far, the model's raw output included
    params: SamplingParams
    num_prompt_tokens: int
    options: ToolOptions | None = None
    constraint: Any = None       # a dict of body fields (first turn) or a callable: turn -> dict
    turn: int = 0
    forced: str = ""             # text the turn was started with (the prompt ends with it), not yet shown
    closing: str = ""            # text added to the turn after a clean stop (constraints.TurnForm)
    turn_text: list[str] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)
    stream: RemoteStream | None = None
    num_output_tokens: int = 0
    num_turn_tokens: int = 0     # output tokens of the turns before this one
    num_cached_tokens: int = 0   # prompt tokens the remote engine found in its prefix cache, all turns
    num_prefill_tokens: int = 0  # prompt tokens it had to compute, all turns
    turn_usage: list[dict[str, Any]] = field(default_factory=list)   # the remote's usage report per turn
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.output_text)


class RemoteRounds:
    """Tool-round methods of RemoteEngine (see the module docstring)."""

    def _on_text(self, request: RemoteRequest, text: str) -> RemoteOutput:
        if request.forced:
            text, request.forced = request.forced + text, ""
        request.turn_text.append(text)
        request.output_text.append(text)
        request.num_output_tokens += 1          # one streamed chunk per token; usage corrects it at the end
        if self.tool_loop is not None:
            self.tool_loop.feed(request.request_id, text)
        return self._output(request, text)

    def _end_turn(self, request: RemoteRequest, finish_reason: str, usage: dict[str, Any]) -> RemoteOutput:
        """The remote engine finished the turn: wait for its calls, or finish the request."""
        text = ""
        if request.forced:          # a turn that streamed nothing after its forced start
            text = self._on_text(request, "").new_text
        if request.closing and finish_reason == "stop":
            text += self._on_text(request, request.closing).new_text
        self._account(request, usage)
        request.prompt += "".join(request.turn_text)
        request.turn_text = []
        if finish_reason == "length":
            return self._finish(request, "length", cancel=True, text=text)
        if self.tool_loop is None or request.request_id not in self.tool_loop.sessions:
            return self._finish(request, "stop", cancel=False, text=text)
        # the stop token is not in the streamed text: the renderer's tail starts with it
        decision = self.tool_loop.end_turn(request.request_id, None)
        if decision == "wait":
            return self._output(request, text)
        return self._finish(request, "stop" if decision == "finish" else "tool_calls", cancel=False, text=text)

    def _account(self, request: RemoteRequest, usage: dict[str, Any]) -> None:
        """Token counts of a finished turn from the remote engine's usage report, where it sends one."""
        request.turn_usage.append(usage)
        if "completion_tokens" in usage:
            request.num_output_tokens = request.num_turn_tokens + int(usage["completion_tokens"])
        request.num_turn_tokens = request.num_output_tokens
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        request.num_cached_tokens += cached
        request.num_prefill_tokens += max(0, int(usage.get("prompt_tokens", 0)) - cached)

    def _poll_tools(self, timeout_s: float) -> list[RemoteOutput]:
        """Tool results in: close the stream of a turn whose call was rejected; continue requests
        whose results are all in with a new remote turn."""
        if self.tool_loop is None or not self.tool_loop.sessions:
            return []
        cut, ready = self.tool_loop.poll(timeout_s)
        outputs = []
        for request_id in cut:
            request = self._requests[request_id]
            if request.stream is not None:
                request.stream.close()          # the remote engine stops decoding this turn
                request.stream = None
            request.prompt += request.forced + "".join(request.turn_text)
            request.forced, request.turn_text = "", []
            request.num_turn_tokens = request.num_output_tokens
            self.tool_loop.cut_turn(request_id)
            outputs.append(self._output(request, ""))
        _, cut_ready = self.tool_loop.poll(0.0) if cut else ([], [])
        return outputs + [self._continue(request_id) for request_id in ready + cut_ready]

    def _continue(self, request_id: str) -> RemoteOutput:
        """Append the tool-result turn to the conversation and start the next remote turn."""
        request = self._requests[request_id]
        final = self.tool_loop.sessions[request_id].final
        if final is not None:       # the results are reported and the request ends (ToolLoop.end_turn)
            return self._finish(request, final, cancel=False, results=self.tool_loop.final_results(request_id))
        text, results = self.tool_loop.next_turn(request_id)
        request.prompt += text
        request.turn += 1
        num_tokens = len(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        if num_tokens >= self.max_model_len or request.num_output_tokens >= request.params.max_tokens:
            return self._finish(request, "length", cancel=False, results=results)
        self._open_turn(request)
        return self._output(request, "", results)

    def _finish(self, request: RemoteRequest, reason: str, *, cancel: bool, text: str = "",
                results: list[ToolResult] | None = None, error: str | None = None) -> RemoteOutput:
        """End the request: close its stream, drop its tool session (cancelling its calls if `cancel`)."""
        if request.stream is not None:
            request.stream.close()
            request.stream = None
        self._requests.pop(request.request_id, None)
        request.finish_reason, request.error = reason, error
        session = self.tool_loop.detach(request.request_id, cancel) if self.tool_loop is not None else None
        return self._output(request, text, results, session.timeline if session else None)

    def _output(self, request: RemoteRequest, text: str, results: list[ToolResult] | None = None,
                timeline: list[Span] | None = None) -> RemoteOutput:
        from conveyor.backends.remote import RemoteOutput

        return RemoteOutput(request.request_id, [], text, request.finished, request.finish_reason,
                            request.num_prompt_tokens, request.num_output_tokens, results or [], timeline,
                            request.num_cached_tokens, request.error, request.num_prefill_tokens)

    def _turn_constraint(self, request: RemoteRequest) -> TurnForm:
        """How the request's next turn is constrained. The caller's constraint wins (a
        dict for the first turn, or a callable of the turn number); else, as in the embedded
        engine, `tool_choice` for the first turn and "auto" for later ones (when
        ToolConfig.constrained), in the remote form of `config.backend.backend_dialect`."""
        given = request.constraint
        if callable(given):
            return TurnForm(dict(given(request.turn) or {}))
        if isinstance(given, dict):
            return TurnForm(dict(given) if request.turn == 0 else {})
        options = request.options
        if options is None or options.call_format in BODY_FORMATS:
            return TurnForm()
        choice = options.tool_choice if request.turn == 0 else "auto"
        constrained = self.config.tools.constrained if options.constrained is None else options.constrained
        if choice == "auto" and not constrained:
            return TurnForm()
        specs = [*(ToolRounds._tool_specs(self, list(options.tools)) or []), *options.client_tools]
        return remote_form(self.config.backend.backend_dialect, specs, choice)
