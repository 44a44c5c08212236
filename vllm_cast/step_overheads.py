"""Step time the cost table does not price, measured online and added to CAST's costs.

The cost table times bare model forwards. A real engine step also pays input preparation,
sampling and bookkeeping (plain decoding too), and drafting pays per-pass work that no
forward shows (attention metadata per draft layer, tree building, vocabulary top-K). The
runner times every decode step and every drafting call against the table's prediction;
this module keeps, per batch-size bucket, the median of the last ``WINDOW`` samples of

- ``plain``: measured minus predicted seconds of a step that verified no drafts, outside
  its drafting call: the target forward with input preparation and sampling; only steps
  whose previous step did not run the draft model or verify drafts (plain decoding's own
  pace: right after a drafting step the target's weights are out of the caches, and on the
  2-core EPYC greedy B=2's plain samples, all from such steps, read 1.2-2.3 ms where B=1's
  steady ones read -0.2 to 0.4 ms);
- ``verify``: the same for a step that verified drafts: its target forward over the trees
  with vLLM's speculative input preparation, tree acceptance, KV compaction and the
  calibrator's bookkeeping (on this CPU ~0.9-1.0 ms more than a plain step's; charging
  verifications the plain overhead priced that difference as free);
- ``first_pass``: of a drafting call (timed on its own, so verification and machine noise
  in the rest of the step do not land on it) outside its layer loop, measured minus
  predicted seconds of its first pass: input preparation, attention metadata, the root's
  top-K and tree decisions, the trees handed back (paid once per drafting call);
- ``per_layer``: of the layer loop, measured minus predicted seconds per tree layer (its
  attention metadata, top-K and builder step).

:meth:`StepOverheads.adjust` adds them to a step's cost curves (``plain`` to every target
step (one token per request), ``verify`` to every verification (until it is measured: ``plain``),
``first_pass`` to the causal first-pass curve, ``per_layer`` to every tree-layer
draft forward), so the builder's thresholds and the final "is this tree faster than plain
decoding" check see what a step really costs here.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import deque
from collections.abc import Hashable

import torch

from vllm_cast.cost_model import StepCosts

WINDOW = 16
"""Recent samples per bucket whose median is used (robust to one-off slow steps)."""
REFRESH_SAMPLES = 4
"""New samples after which a full window's median is recomputed."""
MIN_SAMPLES = 4
"""Samples a bucket needs before its overhead is used (before that: the nearest smaller
bucket's, else 0, optimistic)."""
AFTER_PROMPT_STEPS = 3
"""Decode steps right after a step with prompt rows that are no overhead samples: the
prefill has evicted the caches, and on the 2-core EPYC the first three plain B=4 steps took
2.9-3.4, 2.5-3.0 and 2.4-2.8 ms against ~2.4 ms steady. Plain decoding's first measured
steps at a batch size come right after its prompts (``CastProposer.measures_plain_first``),
so with them the plain overhead read 0.7-1.5 ms where steady plain steps add ~0.06 ms, and
the gate priced plain B=4 steps at 3.9-4.0 ms (explored 6-deep trees at 6.8-8.5 ms a step
where vanilla's steps took 2.8 ms)."""


PLAIN_SAMPLES_LAST = 5.0
"""Seconds after which a bucket's newest plain sample is too old to price plain decoding
where CAST drafts (``StepOverheads.plain_is_stale``; the proposer then measures plain steps
afresh, ``CastProposer.measures_plain_first``). The 2-core EPYC runs 1.3-2x slower for
seconds at a time: plain B=4 steps measured while vanilla's took 5.5 ms priced the plain
B=8 step at 6.7 ms in the cohort ledger while drafted B=8 waves ran next to vanilla steps
of 3.1 ms, and the ledger read cohorts 1.7-2.2x faster than plain decoding that were
0.80-0.95x of vanilla on the wall clock."""


VERIFY_SAMPLES_LAST = PLAIN_SAMPLES_LAST
"""Seconds after which a bucket's verification samples are dropped (verifications there are
then priced as in a bucket never verified). The decline gate prices verifications with them,
and a declined step verifies nothing, so a price too high is never corrected: on the bench
pair at greedy B=4, samples taken while the 2-core EPYC ran slow put the verification
overhead at 7.0 ms (1-2.5 ms in steadier runs, plain steps' 0.56 ms), at which a 2-deep chain
expected to emit 1.9 tokens a request is priced at 21.6 ms against plain decoding's 18.8 ms
for those tokens (16.0 ms at 1.5 ms of overhead). Dropped after this long, and with trees
priced at the batch that verifies them (``CastProposer._declines``), greedy B=4 waves there
read 1.045x of vanilla against 1.021x before (sum of per-wave minima over five rounds, one
process; the EAGLE-3 chain with 2 tokens 0.964x, its loss on sum's long prompts included)."""


def batch_bucket(batch_size: int) -> int:
    """Power-of-two bucket of a batch size: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
    return max(batch_size - 1, 0).bit_length()


class RecentWindows:
    """Per key, the last ``size`` entries (the running windows CAST's measurements keep per
    batch-size bucket)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.windows: dict[Hashable, deque] = {}

    def add(self, key: Hashable, entry) -> None:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = deque(maxlen=self.size)
        window.append(entry)

    def forget(self, key: Hashable) -> None:
        self.windows.pop(key, None)

    def keys(self) -> list:
        return sorted(self.windows)


class RecentMedians(RecentWindows):
    """The median of each key's last ``WINDOW`` samples: the robust running estimate,
    recomputed once a full window has had ``REFRESH_SAMPLES`` new samples (every step adds
    three, and recomputing their medians on each took ~10 us of a speculative step)."""

    def __init__(self) -> None:
        super().__init__(WINDOW)
        self._medians: dict[Hashable, float] = {}
        """Per key, the median of its window as last computed (dropped to be recomputed)."""
        self._added: dict[Hashable, int] = {}
        """Per key, samples added since its median was dropped."""

    def add(self, key: Hashable, entry) -> None:
        filling = len(self.windows.get(key, ())) < WINDOW
        super().add(key, entry)
        added = self._added.get(key, 0) + 1
        if filling or added >= REFRESH_SAMPLES:
            self._medians.pop(key, None)
            added = 0
        self._added[key] = added

    def forget(self, key: Hashable) -> None:
        super().forget(key)
        self._medians.pop(key, None)

    def median(self, key: Hashable, min_samples: int = MIN_SAMPLES) -> float | None:
        """Median of ``key``'s recent samples, or None while it has fewer than ``min_samples``."""
        recent = self.windows.get(key)
        if not recent or len(recent) < min_samples:
            return None
        if key not in self._medians:
            self._medians[key] = statistics.median(recent)
        return self._medians[key]


RESOLUTION_SECONDS = 5e-5
"""Overheads are added in steps of 50 us (about 1% of a plain step on this CPU), so an
adjusted curve is reused while its bucket's medians move less than that (at 10 us a new
median missed the memo on ~70% of drafting calls, each miss rebuilding the curves and the
builder's unit curves; side by side at B=1, ``adjust`` went from 0.13 to 0.10-0.12 ms a call)."""


def _resolution_steps(seconds: float) -> int:
    """An overhead in whole ``RESOLUTION_SECONDS`` steps (clamped at 0: a step is never
    cheaper than its forwards)."""
    return round(max(seconds, 0.0) / RESOLUTION_SECONDS)


ADJUSTED_KEPT = 1024
"""Adjusted cost curves kept for reuse (the memo is emptied when it reaches this size)."""


class StepOverheads:
    """Unpriced seconds per step (plain or verifying drafts), per drafting call (first
    pass) and per tree layer, by batch-size bucket."""

    def __init__(self) -> None:
        self.plain = RecentMedians()
        self.verify = RecentMedians()
        self.first_pass = RecentMedians()
        self.per_layer = RecentMedians()
        self._plain_sampled_at: dict[int, float] = {}
        """Per bucket: ``time.monotonic()`` of its newest plain sample."""
        self._verify_sampled_at: dict[int, float] = {}
        """Per bucket: ``time.monotonic()`` of its newest verification sample."""
        self._adjusted: dict[tuple[int, int], tuple[StepCosts, tuple[int, ...], StepCosts]] = {}
        """(bucket, id of the table's costs) -> (those costs, overheads in resolution steps,
        adjusted costs); holding the costs keeps their id from being reused while memoised."""

    @staticmethod
    def _median(samples: RecentMedians, bucket: int) -> float | None:
        """The bucket's median, or until it has ``MIN_SAMPLES`` that of the nearest smaller
        bucket that has (None: none has). Per-request and per-layer work only grows with the
        batch, so a smaller bucket's overhead is a floor for a new one; left at 0, a batch
        size first met after B=1 priced a 6-deep tree at B=4 at half what it measured
        (drafting 7 ms predicted against 12-17 ms) and explored it."""
        for smaller_or_same in range(bucket, -1, -1):
            median = samples.median(smaller_or_same)
            if median is not None:
                return median
        return None

    def record_step(self, batch_size: int, measured: float, predicted: float, verified_drafts: bool) -> None:
        """A decode step outside its drafting call, against its target forward (seconds);
        ``verified_drafts``: it verified draft tokens (else a plain step)."""
        bucket = batch_bucket(batch_size)
        if verified_drafts:
            self.verify.add(bucket, measured - predicted)
            self._verify_sampled_at[bucket] = time.monotonic()
        else:
            self.plain.add(bucket, measured - predicted)
            self._plain_sampled_at[bucket] = time.monotonic()

    def plain_is_stale(self, batch_size: int) -> bool:
        """Whether the bucket has no plain sample of its own newer than ``PLAIN_SAMPLES_LAST``."""
        sampled_at = self._plain_sampled_at.get(batch_bucket(batch_size))
        return sampled_at is None or time.monotonic() - sampled_at > PLAIN_SAMPLES_LAST

    def forget_plain(self, batch_size: int) -> None:
        """Drop the bucket's plain samples (plain steps about to be measured afresh price it)."""
        bucket = batch_bucket(batch_size)
        self.plain.forget(bucket)
        self._plain_sampled_at.pop(bucket, None)

    def _forget_stale_verifications(self) -> None:
        """Drop the verification samples of every bucket whose newest is older than
        ``VERIFY_SAMPLES_LAST``."""
        oldest_kept = time.monotonic() - VERIFY_SAMPLES_LAST
        for bucket in [b for b, sampled_at in self._verify_sampled_at.items() if sampled_at < oldest_kept]:
            self.verify.forget(bucket)
            del self._verify_sampled_at[bucket]

    def verifications_measured(self, batch_size: int) -> bool:
        """Whether the bucket has ``MIN_SAMPLES`` recent verification samples of its own: steps
        that verified drafts there checked the table's verification cells against measured time."""
        self._forget_stale_verifications()
        return self.verify.median(batch_bucket(batch_size)) is not None

    def record_drafting(self, batch_size: int, measured: float, predicted_first_pass: float, measured_layers: float,
                        predicted_layers: float, layers: int) -> None:
        """One drafting call (seconds): in all ``measured``, of which ``measured_layers`` in its
        loop over ``layers`` tree layers, against the table's first pass and layers."""
        bucket = batch_bucket(batch_size)
        self.first_pass.add(bucket, measured - measured_layers - predicted_first_pass)
        if layers:
            self.per_layer.add(bucket, (measured_layers - predicted_layers) / layers)

    def plain_step_seconds(self, batch_size: int, costs: StepCosts) -> float:
        """``costs``' plain step with this bucket's plain overhead added, as :meth:`adjust`
        prices it (without building the adjusted curves)."""
        plain = self._median(self.plain, batch_bucket(batch_size)) or 0.0
        return costs.plain_step_seconds + _resolution_steps(plain) * RESOLUTION_SECONDS

    def adjust(self, batch_size: int, costs: StepCosts) -> StepCosts:
        """``costs`` with this bucket's overheads added (clamped at 0: a step is never
        cheaper than its forwards)."""
        bucket = batch_bucket(batch_size)
        plain = self._median(self.plain, bucket) or 0.0
        self._forget_stale_verifications()
        verify = self._median(self.verify, bucket)
        steps = tuple(_resolution_steps(seconds) for seconds in (
            plain, plain if verify is None else verify,
            self._median(self.first_pass, bucket) or 0.0, self._median(self.per_layer, bucket) or 0.0))
        if not any(steps):
            return costs
        memo_key = (bucket, id(costs))
        known = self._adjusted.get(memo_key)
        if known is not None and known[1] == steps:
            return known[2]
        plain, verify, first_pass, per_layer = (step * RESOLUTION_SECONDS for step in steps)

        def shifted(curve, by: float | torch.Tensor):
            return None if curve is None else torch.where(curve > 0, curve + by, curve)

        def shifted_target(curve):
            """Index 1 (one token per request: a plain step) by ``plain``, verifications by ``verify``."""
            if curve is None:
                return None
            by = torch.full_like(curve, verify)
            by[1] = plain
            return shifted(curve, by)

        adjusted = dataclasses.replace(costs, draft=shifted(costs.draft, per_layer), target=shifted_target(costs.target),
                                       chain_target=shifted_target(costs.chain_target),
                                       chain_draft=shifted(costs.causal_draft_curve(), first_pass),
                                       verification_overhead=costs.verification_overhead + max(verify - plain, 0.0))
        if len(self._adjusted) >= ADJUSTED_KEPT:
            self._adjusted.clear()
        self._adjusted[memo_key] = (costs, steps, adjusted)
        return adjusted

    def summary(self) -> dict[str, float]:
        """Current medians in milliseconds, keyed ``<plain|verify|first_pass|per_layer>_ms_b<bucket>``."""
        return {f"{name}_ms_b{b}": 1e3 * samples.median(b, min_samples=1)
                for name, samples in (("plain", self.plain), ("verify", self.verify), ("first_pass", self.first_pass),
                                      ("per_layer", self.per_layer))
                for b in samples.keys()}
