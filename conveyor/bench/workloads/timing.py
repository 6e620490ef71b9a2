"""The arithmetic of the workload benchmark: the ideal reduction of a lazy timeline, and spreads.

Pure Python over plain numbers (perf_counter seconds). The *ideal* saving of partial
execution is computed from a lazy round, turn by turn. A turn ends its decode at `decode_end_s`;
call c's first field or line was decoded at `first_event_s` (nothing the tool could act on
exists before it), and in lazy mode its tool ran from `start_s` to `done_s`. Had each call's
work begun at its first event, the turn's tools would be done at
`max(decode_end, max_c(first_event_c + done_c - start_c))` instead of
`max(decode_end, max_c done_c)`: the difference is the tool time that can overlap the decode
following the first event (for one call: min(tool time, decode after its first event)). A
turn whose call a tool rejects (`reject_s`: when the rejected field was decoded) can instead
end there: everything between that event and the tools' end in lazy mode is saved.
The ideal reduction is the sum over turns divided by the lazy completion time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallTiming:
    """One call of a lazy turn."""

    first_event_s: float
    start_s: float
    done_s: float


@dataclass(frozen=True, slots=True)
class TurnTiming:
    """One model turn of a lazy round that ended with calls."""

    decode_end_s: float
    calls: tuple[CallTiming, ...]
    reject_s: float | None = None


def ideal_saving_s(turn: TurnTiming) -> float:
    """Seconds partial execution could save on this turn at best (see the module docstring)."""
    if not turn.calls:
        return 0.0
    lazy_end = max(turn.decode_end_s, max(c.done_s for c in turn.calls))
    if turn.reject_s is not None:
        return max(0.0, lazy_end - turn.reject_s)
    early_end = max(turn.decode_end_s, max(c.first_event_s + c.done_s - c.start_s for c in turn.calls))
    return max(0.0, lazy_end - early_end)


def ideal_reduction(turns: list[TurnTiming], lazy_s: float) -> float:
    """The ideal saving of a whole lazy round as a share of its completion time."""
    if lazy_s <= 0:
        raise ValueError("the lazy completion time must be positive")
    return sum(ideal_saving_s(t) for t in turns) / lazy_s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def efficiency(reduction: float, ideal: float, floor: float = 0.01) -> float | None:
    """Achieved / ideal reduction; None when the ideal is below `floor` (nothing to overlap:
    the goal there is no regression, not a ratio of two noises)."""
    return reduction / ideal if ideal >= floor else None
