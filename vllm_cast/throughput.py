"""Measured decoding throughput, speculating versus not, per batch size: the check that
keeps CAST from ever being slower than plain decoding in practice.

The cost table and the measured overheads price a step before it runs; whatever they miss
(tree attention that scales worse than profiled, per-request bookkeeping that grows with
tree size, machine noise) still shows in the wall time of the steps that ran. The runner
records every decode-only step: tokens emitted per second of steps that verified drafts
(their drafting for the next step included) and of plain steps. Per batch-size bucket and
verification mode (greedy / all sampled) the medians of the recent samples are
compared; while speculating measures slower than plain decoding, the proposer declines its
trees and stays dormant (probing on the dormancy back-off, which keeps the speculative
samples fresh). When only speculating steps have been measured at a batch size, it also
declines once they are enough: the dormant stretch that follows measures plain decoding.

Once both kinds are measured and speculating is slower, the proposer treats speculation
as hopeless at that batch size (the draft model stops running, no probes): the verdict
holds until ``STALE_AFTER_PLAIN_STEPS`` plain steps have followed the last speculative
one; then the old speculative samples are dropped and speculation is measured afresh
(the first ones may have been taken before acceptance was learned, or on other prompts)."""

from __future__ import annotations

from collections import Counter

from vllm_cast.step_overheads import RecentMedians, batch_bucket

STALE_AFTER_PLAIN_STEPS = 256
"""Plain steps after which a bucket's speculative samples are too old to keep CAST from
drafting there (the workload may have changed: other prompts, other acceptance)."""


class MeasuredThroughput:
    """Tokens per second of speculative and plain decode steps (see module doc); each
    (bucket, mode, kind) keeps its last ``step_overheads.WINDOW`` steps, compared once
    both kinds have ``step_overheads.MIN_SAMPLES``."""

    def __init__(self) -> None:
        self.rates = RecentMedians()
        self.plain_steps_since_speculative: Counter[tuple[int, bool]] = Counter()

    def record(self, batch_size: int, all_sampled: bool, speculative: bool, tokens: int, seconds: float) -> None:
        """One decode step that emitted ``tokens`` tokens (all requests) in ``seconds``."""
        if seconds <= 0:
            return
        key = (batch_bucket(batch_size), all_sampled)
        self.rates.add((*key, speculative), tokens / seconds)
        since = self.plain_steps_since_speculative[key] + 1 if not speculative else 0
        if since >= STALE_AFTER_PLAIN_STEPS:
            self.rates.forget((*key, True))
            since = 0
        self.plain_steps_since_speculative[key] = since

    def should_decline(self, batch_size: int, all_sampled: bool) -> bool:
        """Whether to decline speculation at this batch size and mode: its steps measured
        fewer tokens per second than plain ones, or plain steps were never measured here
        (explore them). False until speculative steps have ``MIN_SAMPLES`` samples
        (vllm_cast.step_overheads)."""
        bucket = batch_bucket(batch_size)
        speculative = self.rates.median((bucket, all_sampled, True))
        plain = self.rates.median((bucket, all_sampled, False))
        return speculative is not None and (plain is None or speculative < plain)

    def measured_slower(self, batch_size: int, all_sampled: bool) -> bool:
        """Whether both kinds are measured at this batch size and mode and speculating is
        slower (its samples are dropped after ``STALE_AFTER_PLAIN_STEPS`` plain steps)."""
        bucket = batch_bucket(batch_size)
        speculative = self.rates.median((bucket, all_sampled, True))
        plain = self.rates.median((bucket, all_sampled, False))
        return speculative is not None and plain is not None and speculative < plain

    def summary(self) -> dict[str, float]:
        """Median rates in tokens/s, keyed ``<spec|plain>_tps_b<bucket>[_sampled]``."""
        out = {}
        for bucket, sampled, speculative in self.rates.keys():
            name = f"{'spec' if speculative else 'plain'}_tps_b{bucket}{'_sampled' if sampled else ''}"
            out[name] = self.rates.median((bucket, sampled, speculative), min_samples=1)
        return out
