"""Measured decoding throughput, speculating versus not, per batch size: the check that
keeps CAST from ever being slower than plain decoding in practice.

The cost table and the measured overheads price a step before it runs; whatever they miss
(tree attention that scales worse than profiled, per-request bookkeeping that grows with
tree size, machine noise) still shows in the wall time of the steps that ran. The runner
records every decode-only step: tokens emitted per second of steps that verified drafts
(their drafting for the next step included) and of plain steps. Per batch-size bucket and
verification mode (greedy / all sampled) the medians of the last ``WINDOW`` samples are
compared; while speculating measures slower than plain decoding, the proposer declines its
trees and stays dormant (probing on the dormancy back-off, which keeps the speculative
samples fresh). When only speculating steps have been measured at a batch size, it also
declines once they are enough: the dormant stretch that follows measures plain decoding."""

from __future__ import annotations

import statistics
from collections import deque

from vllm_cast.step_overheads import batch_bucket

WINDOW = 16
"""Recent steps per (bucket, mode, kind) whose median rate is compared."""
MIN_SAMPLES = 4
"""Steps of each kind needed before the comparison is made."""


class MeasuredThroughput:
    """Tokens per second of speculative and plain decode steps (see module doc)."""

    def __init__(self) -> None:
        self.rates: dict[tuple[int, bool, bool], deque[float]] = {}

    def record(self, batch_size: int, all_sampled: bool, speculative: bool, tokens: int, seconds: float) -> None:
        """One decode step that emitted ``tokens`` tokens (all requests) in ``seconds``."""
        if seconds > 0:
            key = (batch_bucket(batch_size), all_sampled, speculative)
            self.rates.setdefault(key, deque(maxlen=WINDOW)).append(tokens / seconds)

    def _median(self, batch_size: int, all_sampled: bool, speculative: bool) -> float | None:
        samples = self.rates.get((batch_bucket(batch_size), all_sampled, speculative))
        return statistics.median(samples) if samples and len(samples) >= MIN_SAMPLES else None

    def should_decline(self, batch_size: int, all_sampled: bool) -> bool:
        """Whether to decline speculation at this batch size and mode: its steps measured
        fewer tokens per second than plain ones, or plain steps were never measured here
        (explore them). False until speculative steps have ``MIN_SAMPLES`` samples."""
        speculative = self._median(batch_size, all_sampled, True)
        plain = self._median(batch_size, all_sampled, False)
        return speculative is not None and (plain is None or speculative < plain)

    def summary(self) -> dict[str, float]:
        """Median rates in tokens/s, keyed ``<spec|plain>_tps_b<bucket>[_sampled]``."""
        out = {}
        for (bucket, sampled, speculative), samples in sorted(self.rates.items()):
            name = f"{'spec' if speculative else 'plain'}_tps_b{bucket}{'_sampled' if sampled else ''}"
            out[name] = statistics.median(samples)
        return out
