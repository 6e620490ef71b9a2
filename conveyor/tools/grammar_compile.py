"""Tool-call grammar compiles that a timeout actually stops.

xgrammar compiles in C++ and cannot be interrupted: a compile run on a thread keeps its
thread (and a core) after the request gave up on it (`--prepare-timeout-s`). Here a compile
runs in a helper process that holds its own `GrammarCompiler` for the tokenizer; the
structural tag goes to it as JSON and the compiled grammar comes back serialized. Past
`timeout_s` the helper is killed (a fresh one starts for the next compile) and the compile
raises TimeoutError. One compile at a time per helper: a waiting one counts against its own
timeout. `ToolGrammar` caches what comes back, so each (tools, choice) pays this once.

The helper is started with "spawn" (the engine's process has torch threads: no fork) and
trusts its parent; the parent unpickles only (bool, str) pairs from it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import xgrammar as xgr
from xgrammar.structural_tag import StructuralTag

_ctx = multiprocessing.get_context("spawn")


class BoundedCompiler:
    """Compiles structural tags for one tokenizer in a killable helper process (see above)."""

    def __init__(self, info: xgr.TokenizerInfo, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._info, self._info_json = info, info.serialize_json()
        self._helper: tuple[BaseProcess, Connection] | None = None
        self._lock = threading.Lock()
        self.num_killed = 0

    def compile_structural_tag(self, tag: StructuralTag) -> xgr.CompiledGrammar:
        """The compiled grammar; TimeoutError past `timeout_s` (the compile is stopped),
        RuntimeError as xgrammar raises it for a schema it cannot compile."""
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"grammar compile still waiting for the compiler after {self.timeout_s:g} s")
        try:
            ok, payload = self._round_trip(tag.model_dump_json(), deadline)
        finally:
            self._lock.release()
        if not ok:
            raise RuntimeError(payload)
        return xgr.CompiledGrammar.deserialize_json(payload, self._info)

    def _round_trip(self, tag_json: str, deadline: float) -> tuple[bool, str]:
        _, conn = self._running()
        try:
            conn.send(tag_json)
            done = conn.poll(max(0.0, deadline - time.monotonic()))
            reply = conn.recv() if done else None
        except (EOFError, OSError) as e:
            self._kill()
            raise RuntimeError(f"the grammar compiler process died: {e}") from e
        if reply is None:
            self._kill()
            raise TimeoutError(f"grammar compile stopped after {self.timeout_s:g} s")
        return reply

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _running(self) -> tuple[BaseProcess, Connection]:
        if self._helper is None or not self._helper[0].is_alive():
            self._kill()
            conn, child = _ctx.Pipe()
            process = _ctx.Process(
                target=_serve, args=(child, self._info_json), name="conveyor-grammar", daemon=True
            )
            process.start()
            child.close()
            self._helper = (process, conn)
        return self._helper

    def _kill(self) -> None:
        if self._helper is None:
            return
        process, conn = self._helper
        self._helper = None
        conn.close()
        if process.is_alive():
            process.kill()
            self.num_killed += 1
        process.join(5.0)


def _serve(conn: Connection, info_json: str) -> None:
    """The helper's loop: a structural tag's JSON in, (True, compiled JSON) or (False, error) out."""
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(info_json), cache_enabled=False)
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        while True:
            tag = StructuralTag.model_validate_json(conn.recv())
            try:
                conn.send((True, compiler.compile_structural_tag(tag).serialize_json()))
            except RuntimeError as e:
                conn.send((False, str(e)))
