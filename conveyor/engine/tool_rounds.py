"""The engine's tool rounds: a request's turn ends with calls -> it waits out of the batch
with its KV kept -> the results are appended as a tool-result turn -> it runs again.

`ToolRounds` is mixed into LLMEngine and uses its scheduler, requests and tool loop.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from conveyor.engine.detokenizer import Detokenizer
from conveyor.engine.request import FinishCause, Request
from conveyor.engine.tool_loop import Span, ToolOptions

if TYPE_CHECKING:
    from conveyor.engine.engine import RequestOutput


BODY_FORMATS = ("python", "plan")   # calls written as a body of lines, not as JSON
_GRAMMAR_LOCK = threading.Lock()    # `prepare` threads and the engine's may build the grammar first


class ToolRounds:
    """Tool-round methods of LLMEngine (see the module docstring)."""

    def _end_turn(self, request: Request, detok: Detokenizer, text: str, stop_text: str | None) -> RequestOutput:
        """The model's turn ended cleanly: wait for its calls, or finish."""
        held = detok.flush()
        self.tool_loop.feed(request.request_id, held)
        decision = self.tool_loop.end_turn(request.request_id, stop_text)
        if decision != "wait":
            cause = {"finish": FinishCause.STOP_STRING if detok.stopped else FinishCause.STOP_TOKEN,
                     "tool_calls": FinishCause.TOOL_CALLS}[decision]
            self.scheduler.finish(request, cause)
            del self._requests[request.request_id]
            return self._output(request, request.output_token_ids[-1:], text + held,
                                timeline=self._detach_tools(request))
        return self._output(request, request.output_token_ids[-1:], text + held)

    def _poll_tools(self, timeout_s: float) -> list[RequestOutput]:
        """Tool results in: cut off turns whose call was rejected; resume requests whose
        results are all in."""
        if self.tool_loop is None:
            return []
        if not self.tool_loop.sessions:     # still let the pool reap workers of cancelled calls
            self.tool_loop.executor.poll(0.0)
            return []
        cut, ready = self.tool_loop.poll(timeout_s)
        outputs = []
        for request_id in cut:
            request, detok = self._requests[request_id]
            self.scheduler.pause_for_tool(request)
            self.tool_loop.cut_turn(request_id)
            outputs.append(self._output(request, [], detok.flush()))
        _, cut_ready = self.tool_loop.poll(0.0) if cut else ([], [])
        return outputs + [self._resume_with_results(request_id) for request_id in ready + cut_ready]

    def _share_cores(self) -> None:
        """Leave a CPU core to each worker computing a tool's code (`ToolConfig.share_cores`;
        one waiting on the network leaves the cores to the forward pass); runners
        without `reserve_cores` (the paced benchmark's stand-in) are left alone."""
        reserve = getattr(self.runner, "reserve_cores", None)
        if self.tool_loop is not None and self.config.tools.share_cores and reserve is not None:
            reserve(self.tool_loop.executor.pool.num_computing())

    def _resume_with_results(self, request_id: str) -> RequestOutput:
        request, _ = self._requests[request_id]
        final = self.tool_loop.sessions[request_id].final
        if final is not None:       # the results are reported and the request ends (ToolLoop.end_turn)
            results = self.tool_loop.final_results(request_id)
            self.scheduler.finish(request, FinishCause.TOOL_CALLS if final == "tool_calls" else FinishCause.LENGTH)
            del self._requests[request_id]
            return self._output(request, [], "", results, self._detach_tools(request))
        text, results = self.tool_loop.next_turn(request_id)
        try:
            self.resume(request_id, text)
        except ValueError:      # the results do not fit in max_model_len
            self.scheduler.finish(request, FinishCause.LENGTH)
            del self._requests[request_id]
            return self._output(request, [], "", results, self._detach_tools(request))
        session = self.tool_loop.sessions[request_id]
        request.constraint = self._constraint(session.options, session.rounds, session.constraint_factory)
        return self._output(request, [], "", results)

    def _detach_tools(self, request: Request) -> list[Span] | None:
        if self.tool_loop is None:
            return None
        clean = request.finish_cause in (FinishCause.STOP_TOKEN, FinishCause.STOP_STRING)
        session = self.tool_loop.detach(request.request_id, cancel=not clean)
        return session.timeline if session else None

    def _tool_options(self, tools: list[str | dict], tool_choice: str | dict, mode: str | None,
                      call_format: str | None, max_tool_rounds: int | None,
                      lenient_calls: bool = True) -> ToolOptions | None:
        """The request's tool settings, or None when it offers no tools. A tool session (the
        engine runs calls) exists only when `tools` names engine tools; `client_tools` (OpenAI
        specs) are the caller's: a turn that calls one ends the request (finish "tool_calls")."""
        names = tuple(t for t in tools if isinstance(t, str))
        client = tuple(t for t in tools if isinstance(t, dict))
        if not (names or client) or tool_choice == "none":
            return None
        if names and self.tool_loop is None:
            raise ValueError(f"this engine serves no tools (start it with ToolConfig(tools=...)); asked for {names}")
        # a python or plan body is free text: no JSON call to constrain
        constrained = False if call_format in BODY_FORMATS else None
        return ToolOptions(names, tool_choice, mode, call_format, max_tool_rounds, constrained, client, lenient_calls)

    def _tool_specs(self, tools: list[str | dict]) -> list[dict] | None:
        if not tools:
            return None
        if self.tool_loop is None and any(isinstance(t, str) for t in tools):
            raise ValueError("this engine serves no tools (start it with ToolConfig(tools=...))")
        registry = self.tool_loop.executor.registry if self.tool_loop else None
        unknown = [t for t in tools if isinstance(t, str) and t not in registry]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; this engine serves {registry.names}")
        return [registry.get(t).spec() if isinstance(t, str) else t for t in tools]

    def _constraint(self, options: ToolOptions | None, turn: int, factory: Any = None) -> Any:
        """The logits constraint of a turn: from the request's factory, else the call format and
        schemas of the offered tools (`tool_choice` applies to the first turn; later ones are "auto")."""
        if factory is not None:
            return factory(turn)
        if options is None:
            return None
        choice = options.tool_choice if turn == 0 else "auto"
        constrained = self.config.tools.constrained if options.constrained is None else options.constrained
        if choice == "auto" and not constrained:
            return None
        with _GRAMMAR_LOCK:
            if self._grammar is None:
                from conveyor.tools.grammar import ToolGrammar

                self._grammar = ToolGrammar(self.tokenizer, self.runner.args.vocab_size, sorted(self.eos_token_ids),
                                            compile_timeout_s=self.config.tools.grammar_timeout_s)
        specs = (self._tool_specs(list(options.tools)) or []) + list(options.client_tools)
        return self._grammar.constraint(specs, choice)

