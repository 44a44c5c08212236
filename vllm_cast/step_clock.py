"""A step's wall time as the engine pays it, for CAST's measurements.

The runner sees a step from ``execute_model`` to the end of ``sample_tokens``. Between
two steps the engine does more: the scheduler's update and next schedule, output
processing and, for the in-process ``LLM``, the frontend's detokenisation. That loop gap
is paid once per step, so speculation, which emits several tokens a step, pays less of
it per token than plain decoding does. On the 2-core EPYC (greedy MT-Bench, vanilla) it
took 0.15 / 0.20 / 0.34 / 0.46 / 0.78 ms at B = 1 / 4 / 8 / 16 / 32, 6-14% of the
runner's 2.3-5.7 ms; left out, CAST priced and measured plain steps that much cheaper
than the wall clock did (at greedy B=8 vLLM's K=1 chain ran 1.07x of vanilla while
CAST's gate declined the same chain as slower).
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOOP_GAP_CAP = 0.5
"""Most loop gap charged to a step, as a fraction of the runner's own time for it: a
longer gap is the engine idling or waiting for requests, not its per-step work."""


class StepClock:
    """Times consecutive engine steps: :meth:`start` when ``execute_model`` begins,
    :meth:`stop` when ``sample_tokens`` ends."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._started = 0.0
        self._ended: float | None = None
        """When the previous step ended (None: no step yet)."""

    def start(self) -> None:
        """A step begins."""
        self._started = self._now()

    def elapsed(self) -> float:
        """Seconds of the running step so far, counted as :meth:`stop` counts them."""
        return self._seconds(self._now())

    def stop(self) -> float:
        """The step ends. Returns its seconds: the runner's own time plus the loop gap
        since the previous step ended (at most ``LOOP_GAP_CAP`` times the own time)."""
        now = self._now()
        seconds = self._seconds(now)
        self._ended = now
        return seconds

    def _seconds(self, now: float) -> float:
        own = now - self._started
        gap = 0.0 if self._ended is None else self._started - self._ended
        return own + min(gap, LOOP_GAP_CAP * own)
