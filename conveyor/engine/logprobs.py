"""Sampled tokens' log-probabilities as the server reports them: ids turned into their bytes."""

from __future__ import annotations

import threading
from typing import Any

from conveyor.core.request import Request, TokenLogprobs
from conveyor.engine.api import Logprob, OutputLogprobs


class TokenBytes:
    """Every token id's bytes, from xgrammar's decoded vocabulary (byte-level BPE and
    SentencePiece byte fallback alike: a token may hold part of a UTF-8 character). Built at
    first use, so engines whose requests never ask for logprobs pay nothing."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._vocab: list[bytes] | None = None
        self._lock = threading.Lock()

    def __call__(self, token_id: int) -> bytes:
        if self._vocab is None:
            with self._lock:
                if self._vocab is None:
                    import xgrammar as xgr  # heavy: only once some request asks for logprobs

                    info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)
                    self._vocab = list(info.decoded_vocab)
        return self._vocab[token_id] if token_id < len(self._vocab) else b""

    def output(self, request: Request, tokens: list[int]) -> list[OutputLogprobs] | None:
        """The logprobs of `tokens` (the request's newest output tokens) that are text: a stop
        token is left out, as its text is. None when the request did not ask for them."""
        if request.params.logprobs is None or len(request.output_logprobs) < len(tokens):
            return None
        entries = request.output_logprobs[len(request.output_logprobs) - len(tokens) :]
        return [self._entry(e) for e in entries if e.token_id not in request.stop_token_ids]

    def _entry(self, entry: TokenLogprobs) -> OutputLogprobs:
        chosen = Logprob(entry.token_id, self(entry.token_id), entry.logprob)
        return OutputLogprobs(chosen, tuple(Logprob(t, self(t), lp) for t, lp in entry.top))
