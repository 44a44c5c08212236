"""Step timing with the engine loop's gap between steps (vllm_cast.step_clock)."""

from __future__ import annotations

from vllm_cast.step_clock import LOOP_GAP_CAP, StepClock


class _Ticks:
    """A clock read in order from a list of times (seconds)."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_a_step_is_charged_the_loop_gap_before_it():
    clock = StepClock(_Ticks(10.0, 10.004, 10.0045, 10.0085))
    clock.start()
    assert abs(clock.stop() - 0.004) < 1e-12, "the first step has no step before it"
    clock.start()
    assert abs(clock.stop() - (0.004 + 0.0005)) < 1e-12, "its own 4 ms plus the 0.5 ms since the last step ended"


def test_idle_time_between_steps_is_not_charged_beyond_the_cap():
    clock = StepClock(_Ticks(0.0, 0.002, 5.0, 5.002))
    clock.start()
    clock.stop()
    clock.start()
    assert abs(clock.stop() - 0.002 * (1 + LOOP_GAP_CAP)) < 1e-12, "five idle seconds are no per-step work"


def test_seconds_so_far_count_as_the_step_will_and_end_nothing():
    clock = StepClock(_Ticks(0.0, 0.004, 0.0045, 0.0065, 0.0085, 0.0090, 0.0095))
    clock.start()
    clock.stop()
    clock.start()
    assert abs(clock.elapsed() - (0.002 + 0.0005)) < 1e-12, "2 ms so far plus the gap before the step"
    assert abs(clock.stop() - (0.004 + 0.0005)) < 1e-12, "the step ends where it would have"
    clock.start()
    assert abs(clock.elapsed() - 0.0005 * (1 + LOOP_GAP_CAP)) < 1e-12, "the gap is capped by the time so far"
