"""The ideal-reduction arithmetic on hand-made timelines."""

from __future__ import annotations

import pytest

from conveyor.bench.workloads.timing import (
    CallTiming,
    TurnTiming,
    efficiency,
    ideal_reduction,
    ideal_saving_s,
    percentile,
)


def test_one_call_saves_the_shorter_of_tool_time_and_decode_after_its_first_event():
    # decode ends at 5 s; the call's first field came at 3 s; lazily its tool ran 5 -> 6 s
    short_tool = TurnTiming(5.0, (CallTiming(3.0, 5.0, 6.0),))
    assert ideal_saving_s(short_tool) == pytest.approx(1.0)  # all of the tool hides behind decoding
    long_tool = TurnTiming(5.0, (CallTiming(3.0, 5.0, 9.0),))
    assert ideal_saving_s(long_tool) == pytest.approx(2.0)  # only the 2 s of decode after the field


def test_calls_started_lazily_before_the_turn_ended_save_only_what_is_left():
    # two calls: the first already ran lazily during the decode of the second
    turn = TurnTiming(4.0, (CallTiming(1.0, 2.0, 3.5), CallTiming(3.0, 4.0, 5.0)))
    # lazy end 5.0; early: max(4.0, 1 + 1.5, 3 + 1) = 4.0
    assert ideal_saving_s(turn) == pytest.approx(1.0)


def test_a_tool_that_finished_before_the_turn_ended_leaves_nothing_to_save():
    assert ideal_saving_s(TurnTiming(4.0, (CallTiming(1.0, 2.0, 3.0),))) == 0.0
    assert ideal_saving_s(TurnTiming(4.0, ())) == 0.0


def test_a_rejected_call_saves_everything_after_the_rejected_field():
    turn = TurnTiming(6.0, (CallTiming(1.0, 6.0, 6.1),), reject_s=2.0)
    assert ideal_saving_s(turn) == pytest.approx(4.1)


def test_ideal_reduction_sums_turns_over_the_lazy_completion_time():
    turns = [TurnTiming(5.0, (CallTiming(3.0, 5.0, 6.0),)), TurnTiming(8.0, (CallTiming(7.5, 8.0, 9.0),))]
    assert ideal_reduction(turns, 10.0) == pytest.approx((1.0 + 0.5) / 10.0)
    with pytest.raises(ValueError):
        ideal_reduction(turns, 0.0)


def test_efficiency_is_undefined_when_there_is_nothing_to_overlap():
    assert efficiency(0.3, 0.4) == pytest.approx(0.75)
    assert efficiency(0.001, 0.002) is None


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([2.0], 90) == 2.0
