"""The soak's fault-injecting server tool (`conveyor.bench.soak_tools:fault`, loaded by spec in
the tool workers like any module:object tool).

Whatever arguments the model writes, each call draws one behaviour at random in its worker:
a quick answer, a sleep, an exception, a large result, a memory spike, a hang past the call's
timeout (the pool must kill and replace the worker) or the worker's death (it must be
replaced). Results and error messages start with `fault:<kind>` so that the client can count
what was injected from the tool results it is streamed.

`fault` draws with the soak's weights (`FAULTS`); `fault_only.<kind>` (the spec
`conveyor.bench.soak_tools:fault_only.large`) is the same tool, named `fault` too, that always
draws one kind, to measure one fault alone (`scripts/soak_kinds.py --faults`). The weights
travel with the pickled tool to the workers, whose environment is wiped.
"""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace
from typing import Any

from conveyor.tools.base import FunctionTool

# kind -> weight (the share of calls that draw it)
FAULTS = {"ok": 30, "sleep": 20, "raise": 15, "large": 15, "memory": 8, "hang": 6, "crash": 6}
LARGE_CHARS = (64 * 1024, 1024 * 1024)
SLEEP_S = (0.05, 2.0)
MEMORY_MB = 256
HANG_S = 3600.0  # far past any call timeout the soak runs with
# from the OS at every draw: workers and their call processes are forked from one that imported
# this module, and a seeded Random() replayed the same draws in all of them (one kind per server)
_rng = random.SystemRandom()


class FaultInjected(RuntimeError):
    """The exception an injected "raise" fault raises."""


def draw(faults: dict[str, int]) -> str:
    kinds = list(faults)
    return _rng.choices(kinds, weights=[faults[k] for k in kinds])[0]


def lookup(key: str) -> str:
    """Look a key up in the flaky store (it may be slow or fail).

    Args:
        key: the key to look up
    """
    raise NotImplementedError  # the schema's signature; FaultTool.finish runs the call


class FaultTool(FunctionTool):
    """The `fault` tool, drawing its behaviour with `faults`' weights."""

    def __init__(self, faults: dict[str, int]) -> None:
        super().__init__(lookup, name="fault", side_effects="none")
        self.faults = dict(faults)

    def finish(self, args: dict[str, Any]) -> str:
        return inject(draw(self.faults), **args)


def inject(kind: str, key: str) -> str:
    """Behave as fault `kind` for a call with `key`."""
    if kind == "sleep":
        time.sleep(_rng.uniform(*SLEEP_S))
    elif kind == "raise":
        raise FaultInjected(f"fault:raise injected error for {key[:40]!r}")
    elif kind == "large":
        return "fault:large " + "x" * _rng.randint(*LARGE_CHARS)
    elif kind == "memory":
        block = bytearray(MEMORY_MB * 1024 * 1024)  # touched pages: a real RSS spike
        block[::4096] = b"\x01" * len(block[::4096])
        return f"fault:memory {MEMORY_MB} MiB touched"
    elif kind == "hang":
        time.sleep(HANG_S)
    elif kind == "crash":
        os._exit(17)
    return f"fault:{kind} value-of-{key[:40]}"


fault = FaultTool(FAULTS)
fault_only = SimpleNamespace(**{kind: FaultTool({kind: 1}) for kind in FAULTS})
