"""LLMEngine: add requests, step, abort; one step is schedule -> run -> update."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from conveyor.config import EngineConfig
from conveyor.core.block_manager import BlockManager
from conveyor.core.intercept import Costs
from conveyor.core.programs import prefix_session_id
from conveyor.core.request import FinishCause, Request, RequestState
from conveyor.core.scheduler import Scheduler
from conveyor.engine.api import (
    ContinuedChat,
    EngineBase,
    EngineStats,
    Params,
    PreparedPrompt,
    Prompt,
    RequestOutput,
    continued_ids,
    non_empty,
    render_prompt,
    sampling_params,
)
from conveyor.engine.detokenizer import Detokenizer
from conveyor.engine.logprobs import TokenBytes
from conveyor.tools.base import ToolResult
from conveyor.tools.driver import Continuation, GrammarForm, Span, ToolDriver
from conveyor.tools.workers import WorkerStats

log = logging.getLogger(__name__)


class LLMEngine(EngineBase):
    """The synchronous engine loop over one model runner. Not thread-safe: drive it from one thread."""

    _requests: dict[str, tuple[Request, Detokenizer]]

    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        *,
        progress: bool = True,
        tools: Iterable[Any] = (),
        runner_factory: Callable[..., Any] | None = None,
    ) -> None:
        """`tools`: more tools to serve besides `config.tools.tools` (Tool objects, typed
        functions or module:object specs); worker processes start here when there are any.
        `runner_factory(model_config, cache_config, model_dir)`: a stand-in for ModelRunner (the
        paced workload benchmark replays recorded tokens on a fixed clock through it)."""
        from transformers import (
            AutoTokenizer,  # heavy imports stay off `import conveyor`
        )

        from conveyor.engine.model.loader import resolve_model, resolve_weights
        from conveyor.engine.runner import ModelRunner

        self.config = config
        weights = resolve_weights(config.model.weights, config.model.device)
        self.model_dir = resolve_model(config.model.model, progress=progress, weights=weights)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.runner = (runner_factory or ModelRunner)(config.model, config.cache, self.model_dir)
        # a stand-in runner without a host pool serves no swapping (intercept: preserve or discard)
        num_host_blocks = (
            self.runner.init_host_pool(config.cache) if hasattr(self.runner, "init_host_pool") else 0
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching, num_host_blocks
        )
        max_len = min(config.model.max_model_len, self.runner.args.max_position_embeddings)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, max_len, self._measure_costs())
        self.max_model_len = self.scheduler.max_model_len
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model_dir)
        self.token_bytes = TokenBytes(self.tokenizer, self.runner.args.vocab_size)
        super().__init__()
        form = GrammarForm(
            self.tokenizer,
            self.runner.args.vocab_size,
            self.eos_token_ids,
            self.config.tools.grammar_timeout_s,
        )
        self.driver = ToolDriver.start([*config.tools.tools, *tools], config.tools, self.tokenizer, form)

    def _measure_costs(self) -> Costs:
        """The intercept policy's costs: a block copy timed now sets the per-step swap budget."""
        if not self.block_manager.num_host_blocks:
            return Costs()
        copy_s = self.runner.time_block_copy()
        budget_s = self.config.scheduler.swap_budget_ms / 1000
        return Costs(swap_s_per_block=copy_s, swap_budget_blocks=max(1, int(budget_s / max(copy_s, 1e-9))))

    def close(self) -> None:
        """Stop the tool workers (the engine serves no more tool calls after this)."""
        self.driver.close()

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt: text as is, chat messages through the model's chat template."""
        if isinstance(prompt, PreparedPrompt):
            return non_empty(self._check_token_ids(prompt.token_ids))
        if isinstance(prompt, ContinuedChat):
            self._check_token_ids(prompt.token_ids)
            return non_empty(
                continued_ids(self.tokenizer, prompt, tools) or self.encode(prompt.messages, tools)
            )
        rendered = render_prompt(self.tokenizer, prompt, tools)
        if isinstance(rendered, str):
            return non_empty(self.tokenizer.encode(rendered, add_special_tokens=False))
        return non_empty(self._check_token_ids(rendered))

    def _check_token_ids(self, ids: list) -> list[int]:
        vocab = self.runner.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be integers in [0, {vocab})")
        return list(ids)

    def prepare(
        self,
        prompt: Prompt,
        *,
        tools: list[str | dict] | None = None,
        tool_choice: str | dict = "auto",
        call_format: str | None = None,
        json_schema: dict | None = None,
        **_: Any,
    ) -> PreparedPrompt:
        """The slow, input-dependent part of `add_request`, safe to run on another thread (the
        server's preparation threads): the chat template rendered and tokenized (the fast
        tokenizer's encode only reads its state) and the tool-call grammars of the request's
        turns compiled into the grammar cache. Pass the result to `add_request` with the same
        options. Raises ValueError (or whatever the template raises) for unusable input."""
        token_ids = self.encode(prompt, self.driver.shown_specs(tools or [], call_format))
        options = self.driver.options(tools or [], tool_choice, None, call_format, None)
        for turn in (0, 1) if options is not None else ():  # turn 1 stands for every later one
            self.driver.constraint(options, turn)
        self.driver.reply_constraint(options, tools or [], tool_choice, json_schema)  # compiled, cached
        if isinstance(prompt, ContinuedChat):
            return PreparedPrompt(prompt.messages, token_ids, continues=_continues(prompt, token_ids))
        return PreparedPrompt(prompt.prompt if isinstance(prompt, PreparedPrompt) else prompt, token_ids)

    def add_request(
        self,
        prompt: Prompt,
        params: Params = None,
        *,
        request_id: str | None = None,
        tools: list[str | dict] | None = None,
        tool_choice: str | dict = "auto",
        tool_mode: str | None = None,
        call_format: str | None = None,
        max_tool_rounds: int | None = None,
        constraint: Any = None,
        lenient_calls: bool = True,
        json_schema: dict | None = None,
        session_id: str | None = None,
        tool_time_s: float | None = None,
    ) -> str:
        """Queue a request; raises ValueError before allocating anything if the input is unusable.

        `tools`: names of the engine's tools the model may call (the engine runs them and
        continues the request with their results) and/or OpenAI tool specs (dicts), which are
        only shown to the model. With `call_format` "python" or "plan" the engine's tools are not
        listed as JSON functions in the chat template: the prompt describes the format. `tool_mode` (partial | lazy), `call_format` (hermes, python,
        plan, auto) and `max_tool_rounds` override the engine's ToolConfig for this request;
        `lenient_calls=False` recognises JSON calls only inside `<tool_call>` tags (fences and
        bare JSON lines in the text stay text).
        `constraint`: a logits constraint (an object with `active`, `fill_mask`, `accept`) for
        the first turn, or a callable that returns one per turn number (default: the tool-call
        grammar from `tool_choice` and ToolConfig.constrained, or `json_schema`'s).
        `json_schema`: the reply is one JSON value that fits this schema (structured output;
        not with tools).
        `session_id`: the program (an agent's session) the request is a turn of, which
        `--schedule` orders as a whole; default: a hash of chat messages' opening.
        `tool_time_s`: the caller's estimate of how long its tools take after this request ends
        with client tool calls (how long its KV is kept: SchedulerConfig.session_kv). A prompt
        prepared from a `ContinuedChat` that matched takes over the KV its source request kept."""
        params = sampling_params(params)
        if tool_time_s is not None and not (isinstance(tool_time_s, int | float) and 0 <= tool_time_s < 1e6):
            raise ValueError(f"tool_time_s must be a number of seconds >= 0, got {tool_time_s!r}")
        options = self.driver.options(
            tools or [], tool_choice, tool_mode, call_format, max_tool_rounds, lenient_calls
        )
        if constraint is None:  # a JSON reply, or tool_choice "none": no call is written
            constraint = self.driver.reply_constraint(options, tools or [], tool_choice, json_schema)
        token_ids = self.encode(prompt, self.driver.shown_specs(tools or [], call_format))
        self._check_length(len(token_ids))
        if any(t >= self.runner.args.vocab_size for t, _ in params.logit_bias):
            raise ValueError(
                f"logit_bias names a token id outside the vocabulary [0, {self.runner.args.vocab_size})"
            )
        request_id = self._new_id(request_id)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        request = Request(
            request_id,
            token_ids,
            params,
            stop_token_ids=frozenset(stops),
            session_id=session_id or _session_of(prompt),
        )
        request.client_tool_s = tool_time_s
        request.client_tools = options if options is not None and options.client_tools else None
        request.continues = (
            prompt.continues if isinstance(prompt, PreparedPrompt) else _continues(prompt, token_ids)
        )
        factory = constraint if callable(constraint) else None
        request.constraint = (
            self.driver.constraint(options, 0, factory) if constraint is None or factory else constraint
        )
        detok = Detokenizer(self.tokenizer, token_ids, params.stop)
        request.pause_on_stop = self.driver.attach(request_id, options, factory)  # engine tools run the calls
        self._requests[request_id] = (request, detok)
        self.scheduler.add(request)
        return request_id

    def get_request(self, request_id: str) -> Request:
        return self._request(request_id)[0]

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request in any state and free its blocks; None if it is unknown or already done."""
        if request_id not in self._requests:
            return None
        request, detok = self._requests.pop(request_id)
        self.scheduler.finish(request, FinishCause.ABORT)
        return self._output(request, [], detok.flush(), timeline=self._detach_tools(request))

    def pause_for_tool(
        self, request_id: str, tool: str | None = None, declared_s: float | None = None
    ) -> str:
        """Take a running request out of the batch while its tools run; the intercept policy keeps,
        swaps or drops its KV (``tool`` and its ``declared_s`` estimate set the expected wait).
        Returns the turn's text still held back (stop-string look-ahead, a partial character)."""
        request, detok = self._request(request_id)
        self.scheduler.pause_for_tool(request, tool, declared_s)
        return detok.flush()

    def resume(self, request_id: str, appended: list[int] | str) -> None:
        """Continue a paused request after appending ``appended`` (token ids or text, e.g. a
        rendered tool-result turn); only those tokens and the last sampled one are prefilled."""
        request, detok = self._request(request_id)
        if isinstance(appended, str):
            ids = self.tokenizer.encode(appended, add_special_tokens=False)
        elif isinstance(appended, list):
            ids = self._check_token_ids(appended)
        else:
            raise ValueError(f"appended must be text or token ids, not {type(appended).__name__}")
        self.scheduler.resume(request, ids)
        detok.skip_context(ids)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            bm.num_blocks,
            bm.num_used_blocks,
            self.driver.num_waiting,
            workers=WorkerStats.of(self.driver),
            num_session_blocks=self.scheduler.sessions.num_blocks,
        )

    # ---- the loop -------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self.driver.num_waiting)

    def step(self) -> list[RequestOutput]:
        """Collect tool results, schedule, run one forward pass, update requests; returns
        outputs of requests that changed. Waits briefly for tools when nothing else can run."""
        outputs = self._poll_tools(0.0)
        plan = self.scheduler.schedule()
        if plan.swaps:
            self.runner.swap(plan.swaps)
        if not plan.chunks:
            if self.driver.num_waiting:
                outputs += self._poll_tools(0.05)
            return outputs
        self._share_cores()
        start = time.perf_counter()
        sampled = self.runner.execute(plan)
        self.scheduler.costs.observe_step(plan.num_tokens, time.perf_counter() - start)
        for request in self.scheduler.postprocess(plan, sampled):
            outputs.append(self._isolated(request, self._update, request))
        self.driver.hand_off()
        return outputs

    def _update(self, request: Request) -> RequestOutput:
        _, detok = self._requests[request.request_id]
        token = request.output_token_ids[-1]
        by_token = token in request.stop_token_ids
        text = "" if by_token else detok.push(token)
        tools = self.driver.runs(request.request_id)
        if tools:
            self.driver.feed(request.request_id, text)
        if detok.stopped:  # a stop string wins over a length limit reached on the same token
            if request.finished:
                request.finish_cause = FinishCause.STOP_STRING
            elif tools:
                self.scheduler.pause_for_tool(request)
            else:
                self.scheduler.finish(request, FinishCause.STOP_STRING)
        if request.state is RequestState.AWAITING_TOOL:
            return self._end_turn(request, detok, text, self.tokenizer.decode([token]) if by_token else None)
        timeline = None
        if request.finished:
            self._settle_session(request)
            text += detok.flush()
            del self._requests[request.request_id]
            timeline = self._detach_tools(request)
        return self._output(request, [token], text, timeline=timeline)

    def _settle_session(self, request: Request) -> None:
        """A request the driver did not run kept its KV at its stop token for a follow-up: keep
        it only if its turn called the client's tools (their names key the expected time)."""
        if request.request_id not in self.scheduler.sessions.retained:
            return
        if request.finish_cause is FinishCause.STOP_TOKEN:  # not a stop string: its tokens are reusable
            text = self.tokenizer.decode(request.output_token_ids[:-1])
            request.tool = self.driver.client_tool_in(request.client_tools, text)
        if request.tool is None:
            self.scheduler.sessions.release(request)

    def _isolated(self, request: Request, work: Callable[..., RequestOutput], *args: Any) -> RequestOutput:
        """`work(*args)` for one request; whatever it raises ends that request alone with
        finish "error" (blocks freed, calls cancelled), never the step or the engine."""
        try:
            return work(*args)
        except Exception as e:
            log.exception("request %s failed", request.request_id)
            self._requests.pop(request.request_id, None)
            if not request.finished:
                self.scheduler.finish(request, FinishCause.ERROR)
            out = self._output(request, [], "", timeline=self._detach_tools(request))
            out.error = f"{type(e).__name__}: {e}"
            return out

    def _output(
        self,
        request: Request,
        tokens: list[int],
        text: str,
        results: list[ToolResult] | None = None,
        timeline: list[Span] | None = None,
    ) -> RequestOutput:
        # tokens that needed KV so far, minus those the model computed: the prefix cache's share
        cached = max(0, request.num_tokens - 1 - request.num_computed_total)
        ended_by_token = (
            request.finish_cause in (FinishCause.STOP_TOKEN, FinishCause.TOOL_CALLS)
            and request.token_ids[-1] in request.stop_token_ids
        )
        return RequestOutput(
            request.request_id,
            tokens,
            text,
            request.finished,
            request.finish_reason,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            results or [],
            timeline,
            cached,
            logprobs=self.token_bytes.output(request, tokens),
            final_token_ids=list(request.token_ids) if ended_by_token and request.output_token_ids else None,
        )

    def _request(self, request_id: str) -> tuple[Request, Detokenizer]:
        try:
            return self._requests[request_id]
        except KeyError:
            raise ValueError(f"unknown or finished request {request_id!r}") from None

    # ---- tool rounds (the driver runs them; the engine settles the request's KV and state) --
    def _end_turn(
        self, request: Request, detok: Detokenizer, text: str, stop_text: str | None
    ) -> RequestOutput:
        """The model's turn ended cleanly: wait for its calls, or finish."""
        held = detok.flush()
        self.driver.feed(request.request_id, held)
        decision = self.driver.end_turn(request.request_id, stop_text)
        if decision != "wait":
            cause = {
                "finish": FinishCause.STOP_STRING if detok.stopped else FinishCause.STOP_TOKEN,
                "tool_calls": FinishCause.TOOL_CALLS,
            }[decision]
            self.scheduler.finish(request, cause, self.driver.client_tool(request.request_id))
            del self._requests[request.request_id]
            return self._output(
                request, request.output_token_ids[-1:], text + held, timeline=self._detach_tools(request)
            )
        return self._output(request, request.output_token_ids[-1:], text + held)

    def _poll_tools(self, timeout_s: float) -> list[RequestOutput]:
        """Tool results in: take turns cut off by a rejected call out of the batch; resume
        requests whose results are all in."""
        cut, ready = self.driver.poll(timeout_s)
        outputs = []
        for request_id in cut:
            request, detok = self._requests[request_id]
            self.scheduler.pause_for_tool(request)
            outputs.append(self._output(request, [], detok.flush()))
        return outputs + [self._resume_with_results(c) for c in ready]

    def _share_cores(self) -> None:
        """Leave a CPU core to each worker computing a tool's code (`ToolConfig.share_cores`;
        one waiting on the network leaves the cores to the forward pass); runners
        without `reserve_cores` (the paced benchmark's stand-in) are left alone."""
        reserve = getattr(self.runner, "reserve_cores", None)
        if self.config.tools.share_cores and reserve is not None and self.driver.executor is not None:
            reserve(self.driver.num_computing())

    def _resume_with_results(self, ready: Continuation) -> RequestOutput:
        request, _ = self._requests[ready.request_id]
        if ready.final is not None:  # the results are reported and the request ends
            self.scheduler.finish(
                request, FinishCause.TOOL_CALLS if ready.final == "tool_calls" else FinishCause.LENGTH
            )
            return self._end_with(request, ready.results)
        try:
            self.resume(ready.request_id, ready.text)
        except ValueError:  # the results do not fit in max_model_len
            self.scheduler.finish(request, FinishCause.LENGTH)
            return self._end_with(request, ready.results)
        request.constraint = self.driver.next_constraint(ready.request_id)
        return self._output(request, [], "", ready.results)

    def _end_with(self, request: Request, results: list[ToolResult]) -> RequestOutput:
        del self._requests[request.request_id]
        return self._output(request, [], "", results, self._detach_tools(request))

    def _detach_tools(self, request: Request) -> list[Span] | None:
        clean = request.finish_cause in (FinishCause.STOP_TOKEN, FinishCause.STOP_STRING)
        return self.driver.detach(request.request_id, cancel=not clean)


def _continues(prompt: Prompt, token_ids: list[int]) -> str | None:
    """The request a `ContinuedChat` continues, if its reused tokens did begin the prompt."""
    if isinstance(prompt, ContinuedChat) and token_ids[: len(prompt.token_ids)] == prompt.token_ids:
        return prompt.source_id
    return None


def _eos_token_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def _session_of(prompt: Prompt) -> str | None:
    """The conversation-prefix session id of chat messages (as given, or as prepared; a
    continued chat's whole conversation)."""
    messages = prompt.prompt if isinstance(prompt, PreparedPrompt) else prompt
    messages = messages.messages if isinstance(messages, ContinuedChat) else messages
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return prefix_session_id(messages)
    return None
