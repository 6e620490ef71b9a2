"""LLMEngine: add requests, step, abort; one step is schedule -> run -> update."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.config import EngineConfig
from conveyor.engine.block_manager import BlockManager
from conveyor.engine.detokenizer import Detokenizer
from conveyor.engine.request import FinishCause, Request, SamplingParams
from conveyor.engine.scheduler import Scheduler

Prompt = str | list[int] | list[dict[str, Any]]


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


class LLMEngine:
    """The synchronous engine loop over one model runner. Not thread-safe: drive it from one thread."""

    def __init__(self, config: EngineConfig = EngineConfig(), *, progress: bool = True) -> None:
        from transformers import AutoTokenizer  # heavy imports stay off `import conveyor`

        from conveyor.engine.model.loader import resolve_model
        from conveyor.engine.runner import ModelRunner

        self.config = config
        self.model_dir = resolve_model(config.model.model, progress=progress)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.runner = ModelRunner(config.model, config.cache, self.model_dir)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching)
        max_len = min(config.model.max_model_len, self.runner.args.max_position_embeddings)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, max_len)
        self.max_model_len = self.scheduler.max_model_len
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.model_dir)
        self._requests: dict[str, tuple[Request, Detokenizer]] = {}
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt: text as is, chat messages through the model's chat template."""
        if isinstance(prompt, str):
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

    def add_request(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
                    request_id: str | None = None, tools: list[dict] | None = None, constraint: Any = None) -> str:
        """Queue a request; raises ValueError before allocating anything if the input is unusable.
        ``constraint``: a ``tools.grammar.Constraint`` that masks the turn's tokens (None: free)."""
        params = _sampling_params(params)
        token_ids = self.encode(prompt, tools)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the limit is {self.max_model_len - 1} "
                             f"(max_model_len {self.max_model_len} leaves room for one output token)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        request = Request(request_id, token_ids, params, stop_token_ids=frozenset(stops), constraint=constraint)
        self._requests[request_id] = (request, Detokenizer(self.tokenizer, token_ids, params.stop))
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
        return self._output(request, [], detok.flush())

    def pause_for_tool(self, request_id: str) -> str:
        """Take a running request out of the batch while its tools run; its KV stays.
        Returns the turn's text still held back (stop-string look-ahead, a partial character)."""
        request, detok = self._request(request_id)
        self.scheduler.pause_for_tool(request)
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

    # ---- the loop -------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, update requests; returns outputs of requests that changed."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        sampled = self.runner.execute(plan)
        outputs = []
        for request in self.scheduler.postprocess(plan, sampled):
            outputs.append(self._update(request))
        return outputs

    def _update(self, request: Request) -> RequestOutput:
        _, detok = self._requests[request.request_id]
        token = request.output_token_ids[-1]
        text = "" if token in request.stop_token_ids else detok.push(token)
        if detok.stopped:   # a stop string wins over a length limit reached on the same token
            if request.finished:
                request.finish_cause = FinishCause.STOP_STRING
            else:
                self.scheduler.finish(request, FinishCause.STOP_STRING)
        if request.finished:
            text += detok.flush()
            del self._requests[request.request_id]
        return self._output(request, [token], text)

    def _output(self, request: Request, tokens: list[int], text: str) -> RequestOutput:
        return RequestOutput(request.request_id, tokens, text, request.finished, request.finish_reason,
                             len(request.prompt_token_ids), len(request.output_token_ids))

    def _request(self, request_id: str) -> tuple[Request, Detokenizer]:
        try:
            return self._requests[request_id]
        except KeyError:
            raise ValueError(f"unknown or finished request {request_id!r}") from None

    # ---- conveniences ---------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | dict | None = None) -> Iterator[RequestOutput]:
        """Add one request and step the engine until it finishes, yielding its outputs.
        Outputs of other requests in the engine are not returned: serve many with ``step``."""
        request_id = self.add_request(prompt, params)
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
