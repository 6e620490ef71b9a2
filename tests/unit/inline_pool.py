"""An in-process stand-in for WorkerPool: runs hooks synchronously and logs what ran."""

from __future__ import annotations

import json
import time
from typing import Any

from conveyor.tools.base import CallInfo, Tool, ToolRegistry, ToolRejected, ToolResult


class InlinePool:
    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry
        self.tools: dict[str, tuple[CallInfo, Tool]] = {}
        self.results: list[ToolResult] = []
        self.log: list[tuple[str, str, Any]] = []  # (call_id, hook, detail)
        self.dead: set[str] = set()

    def hand_off(self) -> None:
        """Nothing to hand off: hooks run inline, never in the background."""

    def num_computing(self) -> int:
        return 0

    def open_call(self, call: CallInfo, sent_at: float) -> None:
        tool = self.registry.get(call.name).for_call()
        self.tools[call.call_id] = (call, tool)
        self._run(call.call_id, "start", lambda: tool.start(call))

    def send_field(self, call_id: str, key: str, value: Any, sent_at: float) -> None:
        self._hook(call_id, "field", (key, value), lambda t: t.on_field(key, value))

    def send_line(self, call_id: str, line: str, sent_at: float) -> None:
        self._hook(call_id, "line", line, lambda t: t.on_line(line))

    def finish(self, call_id: str, args: dict) -> None:
        if call_id in self.dead:
            return
        assert call_id in self.tools, f"finish before open_call for {call_id}"
        call, tool = self.tools.pop(call_id)
        self.log.append((call_id, "finish", args))
        try:
            value = tool.finish(args)
            content = value if isinstance(value, str) else json.dumps(value)
            self.results.append(ToolResult(call_id, call.name, content, done_at=time.perf_counter()))
        except Exception as e:  # noqa: BLE001 - an error result, as in a worker
            self.results.append(ToolResult(call_id, call.name, f"{type(e).__name__}: {e}", is_error=True))

    def cancel(self, call_id: str) -> None:
        self.log.append((call_id, "cancel", None))
        entry = self.tools.pop(call_id, None)
        if entry:
            entry[1].cancel()

    def poll(self, timeout_s: float = 0.0) -> list[ToolResult]:
        results, self.results = self.results, []
        return results

    def _hook(self, call_id: str, name: str, detail: Any, fn) -> None:
        if call_id in self.dead:
            return
        _, tool = self.tools[call_id]
        self._run(call_id, name, lambda: fn(tool), detail)

    def _run(self, call_id: str, name: str, fn, detail: Any = None) -> None:
        self.log.append((call_id, name, detail))
        try:
            fn()
        except ToolRejected as e:
            call, _ = self.tools.pop(call_id)
            self.dead.add(call_id)
            self.results.append(ToolResult(call_id, call.name, str(e), is_error=True, rejected=True))

    def hooks(self, name: str) -> list[tuple[str, str, Any]]:
        return [entry for entry in self.log if entry[1] == name]
