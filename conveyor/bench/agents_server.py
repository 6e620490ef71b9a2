"""`conveyor serve` with the agents benchmark's model turns forced (forced-token replay).

`python -m conveyor.bench.agents_server SCRIPT.json [conveyor serve flags]`: SCRIPT maps a
session id to the texts of its model turns in order. A chat request whose session id (the
`X-Session-Id` header the benchmark's client sends) is in the script gets, as its first turn's
constraint, a `Replay` of the text after as many assistant messages as its conversation holds,
tokenized, then the end-of-turn token. Every forward pass is real: the runner computes the
logits and the sampler takes the one token the replay allows; the server, its call parser and
its `tool_calls` answers are the real ones. Other requests decode freely.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from conveyor.bench.workloads.paced import Replay
from conveyor.engine.api import ContinuedChat, PreparedPrompt


class ReplayEngine:
    """An engine whose scripted sessions' turns are forced; everything else is the wrapped one's."""

    def __init__(self, engine: Any, script: dict[str, list[str]]) -> None:
        self.engine = engine
        self.script = script
        vocab = engine.tokenizer.get_vocab()
        self.end_of_turn = vocab.get(
            "<|im_end|>", engine.tokenizer.eos_token_id
        )  # as the template ends a turn

    def add_request(self, prompt: Any, params: Any = None, **options: Any) -> str:
        texts = self.script.get(options.get("session_id") or "")
        given = prompt.prompt if isinstance(prompt, PreparedPrompt) else prompt
        given = given.messages if isinstance(given, ContinuedChat) else given  # an exact continuation's
        if texts and isinstance(given, list):
            turn = sum(1 for m in given if isinstance(m, dict) and m.get("role") == "assistant")
            if turn >= len(texts):
                raise ValueError(
                    f"session {options['session_id']!r} has {len(texts)} scripted turns, not {turn + 1}"
                )
            ids = self.engine.tokenizer.encode(texts[turn], add_special_tokens=False) + [self.end_of_turn]
            options["constraint"] = lambda n: Replay(ids) if n == 0 else None
        return self.engine.add_request(prompt, params, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def main(argv: list[str]) -> None:
    from conveyor.backends import open_engine
    from conveyor.cli import build_parser
    from conveyor.config import ServerConfig, engine_config_from_flags, from_flags
    from conveyor.server.serve import serve

    script = json.loads(Path(argv[0]).read_text())
    args = build_parser().parse_args(["serve", *argv[1:]])
    serve(
        engine_config_from_flags(args),
        from_flags(ServerConfig, args),
        engine_factory=lambda config, **kw: ReplayEngine(open_engine(config, **kw), script),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
