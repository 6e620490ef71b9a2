"""LLMEngine: add requests, step, abort; one step is schedule -> run -> update."""
from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.config import EngineConfig
from conveyor.engine.block_manager import BlockManager
from conveyor.engine.detokenizer import Detokenizer
from conveyor.engine.intercept import Costs
from conveyor.engine.request import FinishCause, Request, RequestState, SamplingParams
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.tool_loop import Span, ToolLoop
from conveyor.engine.tool_rounds import BODY_FORMATS, ToolRounds
from conveyor.tools.base import ToolResult
from conveyor.tools.workers import WorkerStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A prompt rendered and tokenized ahead of `add_request` (`LLMEngine.prepare`, off the
    engine's thread); `prompt` is what the caller gave."""
    prompt: str | list[int] | list[dict[str, Any]]
    token_ids: list[int]


Prompt = str | list[int] | list[dict[str, Any]] | PreparedPrompt


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    tool_results: list[ToolResult] = field(default_factory=list)  # a tool round's results, when it resumes
    timeline: list[Span] | None = None          # decode / tool / wait spans, on the last output
    num_cached_tokens: int = 0                  # tokens whose KV came from the prefix cache
    error: str | None = None                    # why, when finish_reason is "error"


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counts for monitoring (the server's /metrics)."""
    num_blocks: int
    num_used_blocks: int
    num_awaiting_tools: int
    workers: WorkerStats = WorkerStats()


class LLMEngine(ToolRounds):
    """The synchronous engine loop over one model runner. Not thread-safe: drive it from one thread."""

    def __init__(self, config: EngineConfig = EngineConfig(), *, progress: bool = True,
                 tools: Iterable[Any] = (), runner_factory: Callable[..., Any] | None = None) -> None:
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
        num_host_blocks = self.runner.init_host_pool(config.cache) if hasattr(self.runner, "init_host_pool") else 0
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching,
                                          num_host_blocks)
        max_len = min(config.model.max_model_len, self.runner.args.max_position_embeddings)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, max_len, self._measure_costs())
        self.max_model_len = self.scheduler.max_model_len
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model_dir)
        self._requests: dict[str, tuple[Request, Detokenizer]] = {}
        self._ids = itertools.count()
        self.tool_loop: ToolLoop | None = None
        self._grammar: Any = None
        specs = [*config.tools.tools, *tools]
        if specs:
            from conveyor.engine.tool_setup import start_tool_loop

            self.tool_loop = start_tool_loop(specs, config.tools, self.tokenizer)

    def _measure_costs(self) -> Costs:
        """The intercept policy's costs: a block copy timed now sets the per-step swap budget."""
        if not self.block_manager.num_host_blocks:
            return Costs()
        copy_s = self.runner.time_block_copy()
        budget_s = self.config.scheduler.swap_budget_ms / 1000
        return Costs(swap_s_per_block=copy_s, swap_budget_blocks=max(1, int(budget_s / max(copy_s, 1e-9))))

    def close(self) -> None:
        """Stop the tool workers (the engine serves no more tool calls after this)."""
        if self.tool_loop is not None:
            self.tool_loop.executor.pool.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt: text as is, chat messages through the model's chat template."""
        if isinstance(prompt, PreparedPrompt):
            ids = self._check_token_ids(prompt.token_ids)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(prompt, list):
            ids = self._check_token_ids(prompt)
        else:
            raise ValueError(f"a prompt is text, chat messages or token ids, not {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _check_token_ids(self, ids: list) -> list[int]:
        vocab = self.runner.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be integers in [0, {vocab})")
        return list(ids)

    def prepare(self, prompt: Prompt, *, tools: list[str | dict] | None = None, tool_choice: str | dict = "auto",
                call_format: str | None = None, **_: Any) -> PreparedPrompt:
        """The slow, input-dependent part of `add_request`, safe to run on another thread (the
        server's preparation threads): the chat template rendered and tokenized (the fast
        tokenizer's encode only reads its state) and the tool-call grammars of the request's
        turns compiled into the grammar cache. Pass the result to `add_request` with the same
        options. Raises ValueError (or whatever the template raises) for unusable input."""
        shown = [t for t in tools or [] if isinstance(t, dict) or call_format not in BODY_FORMATS]
        token_ids = self.encode(prompt, self._tool_specs(shown))
        options = self._tool_options(tools or [], tool_choice, None, call_format, None)
        for turn in (0, 1) if options is not None else ():    # turn 1 stands for every later one
            self._constraint(options, turn)
        return PreparedPrompt(prompt.prompt if isinstance(prompt, PreparedPrompt) else prompt, token_ids)

    def add_request(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
                    request_id: str | None = None, tools: list[str | dict] | None = None,
                    tool_choice: str | dict = "auto", tool_mode: str | None = None, call_format: str | None = None,
                    max_tool_rounds: int | None = None, constraint: Any = None, lenient_calls: bool = True) -> str:
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
        grammar from `tool_choice` and ToolConfig.constrained)."""
        params = _sampling_params(params)
        options = self._tool_options(tools or [], tool_choice, tool_mode, call_format, max_tool_rounds, lenient_calls)
        shown = [t for t in tools or [] if isinstance(t, dict) or call_format not in BODY_FORMATS]
        token_ids = self.encode(prompt, self._tool_specs(shown))
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the limit is {self.max_model_len - 1} "
                             f"(max_model_len {self.max_model_len} leaves room for one output token)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        request = Request(request_id, token_ids, params, stop_token_ids=frozenset(stops))
        factory = constraint if callable(constraint) else None
        request.constraint = self._constraint(options, 0, factory) if constraint is None or factory else constraint
        detok = Detokenizer(self.tokenizer, token_ids, params.stop)
        if options is not None and options.tools:     # engine tools: a tool session runs the calls
            request.pause_on_stop = True
            self.tool_loop.attach(request_id, options).constraint_factory = factory
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

    def pause_for_tool(self, request_id: str, tool: str | None = None, declared_s: float | None = None) -> str:
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
        return EngineStats(bm.num_blocks, bm.num_used_blocks, self.tool_loop.num_waiting if self.tool_loop else 0,
                           WorkerStats.of(self.tool_loop))

    # ---- the loop -------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self.tool_loop and self.tool_loop.num_waiting)

    def step(self) -> list[RequestOutput]:
        """Collect tool results, schedule, run one forward pass, update requests; returns
        outputs of requests that changed. Waits briefly for tools when nothing else can run."""
        outputs = self._poll_tools(0.0)
        plan = self.scheduler.schedule()
        if plan.swaps:
            self.runner.swap(plan.swaps)
        if not plan.chunks:
            if self.tool_loop is not None and self.tool_loop.num_waiting:
                outputs += self._poll_tools(0.05)
            return outputs
        self._share_cores()
        start = time.perf_counter()
        sampled = self.runner.execute(plan)
        self.scheduler.costs.observe_step(plan.num_tokens, time.perf_counter() - start)
        for request in self.scheduler.postprocess(plan, sampled):
            outputs.append(self._isolated(request, self._update, request))
        if self.tool_loop is not None:
            self.tool_loop.executor.pool.hand_off()
        return outputs

    def _update(self, request: Request) -> RequestOutput:
        _, detok = self._requests[request.request_id]
        token = request.output_token_ids[-1]
        by_token = token in request.stop_token_ids
        text = "" if by_token else detok.push(token)
        tools = self.tool_loop is not None and request.request_id in self.tool_loop.sessions
        if tools:
            self.tool_loop.feed(request.request_id, text)
        if detok.stopped:   # a stop string wins over a length limit reached on the same token
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
            text += detok.flush()
            del self._requests[request.request_id]
            timeline = self._detach_tools(request)
        return self._output(request, [token], text, timeline=timeline)

    def _isolated(self, request: Request, work: Callable[..., RequestOutput], *args: Any) -> RequestOutput:
        """`work(*args)` for one request; whatever it raises ends that request alone with
        finish "error" (blocks freed, calls cancelled), never the step or the engine."""
        try:
            return work(*args)
        except Exception as e:  # noqa: BLE001 - one request's fault is not the batch's
            log.exception("request %s failed", request.request_id)
            self._requests.pop(request.request_id, None)
            if not request.finished:
                self.scheduler.finish(request, FinishCause.ERROR)
            out = self._output(request, [], "", timeline=self._detach_tools(request))
            out.error = f"{type(e).__name__}: {e}"
            return out

    def _output(self, request: Request, tokens: list[int], text: str, results: list[ToolResult] | None = None,
                timeline: list[Span] | None = None) -> RequestOutput:
        # tokens that needed KV so far, minus those the model computed: the prefix cache's share
        cached = max(0, request.num_tokens - 1 - request.num_computed_total)
        return RequestOutput(request.request_id, tokens, text, request.finished, request.finish_reason,
                             len(request.prompt_token_ids), len(request.output_token_ids), results or [], timeline,
                             cached)

    def _request(self, request_id: str) -> tuple[Request, Detokenizer]:
        try:
            return self._requests[request_id]
        except KeyError:
            raise ValueError(f"unknown or finished request {request_id!r}") from None

    # ---- conveniences ---------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | dict | None = None,
               **options: Any) -> Iterator[RequestOutput]:
        """Add one request (``options`` as for ``add_request``) and step the engine until it
        finishes, yielding its outputs. Other requests' outputs are not returned: serve many with ``step``."""
        request_id = self.add_request(prompt, params, **options)
        try:
            while request_id in self._requests:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
        finally:
            self.abort(request_id)

    def generate(self, prompts: list[Prompt], params: SamplingParams | dict | None = None) -> list[Request]:
        """Run prompts to completion together; returns the finished requests in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        requests = [self.get_request(i) for i in ids]
        while any(not r.finished for r in requests):
            self.step()
        return requests


def _sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    unknown = set(params) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    return SamplingParams(**params)


def _eos_token_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
