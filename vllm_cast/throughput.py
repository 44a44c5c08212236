"""Measured decoding throughput, speculating versus not, per batch size: the check that
keeps CAST from ever being slower than plain decoding in practice.

The cost table and the measured overheads price a step before it runs; whatever they miss
(tree attention that scales worse than profiled, per-request bookkeeping that grows with
tree size, machine noise) still shows in the wall time of the steps that ran. The runner
records every decode-only step, speculative (it verified drafts or ran the drafter) or
plain (neither), and charges the drafter's time on steps with new prompts (their draft
first pass, which plain decoding never pays and short requests feel most) to speculation,
crediting the drafts that step's decoding requests accepted.
Per batch-size bucket and verification mode (greedy / all sampled) the tokens and seconds of
the recent entries are pooled into tokens per second and compared; while speculating
measures slower than plain decoding (judged on whole requests once it can be, below), the
proposer declines its
trees and stays dormant (probing on the dormancy back-off, which keeps the speculative
samples fresh). When only speculating steps have been measured at a batch size, it also
declines once they are enough: the dormant stretch that follows measures plain decoding.

A verdict, once both kinds are measured, is formed against the plain steps of its time and
held until new speculative samples arrive: the plain steps that follow do not re-judge old
speculative ones. Step times drift by task and by machine state (plain B=4 steps measured
4.7 ms in one cell and 7-8 ms in a later one of the same run); compared against the drifting
plain window, a "slower" verdict formed on MT-Bench flipped on a later task and CAST
explored again (three times in six greedy B=4 cells: 0.84x of vanilla there).

Once both kinds are measured and speculating is slower, the proposer treats speculation
as hopeless at that batch size (its requests are not drafted, no probes): the verdict
holds until enough plain steps have followed the last speculative one (``_stale_wait``:
fewer the closer its cohorts came to plain decoding, ``REEXAMINATION_LOSS``); then the old
speculative samples are dropped and speculation is measured afresh (the first ones may
have been taken before acceptance was learned, or on other prompts).

A bucket without a verdict of its own takes that of the nearest smaller bucket that has one
when it says slower: speculation's gain only shrinks as the batch grows (the target forward
turns compute-bound and every request's tree adds rows), so a batch size where it measured
slower rules out the larger ones without exploring each (under continuous batching the batch
size moves through several buckets, and exploring each one drafted new prompts in every
bucket). When such a bucket goes stale, the smaller buckets' speculative samples are dropped
too, so that evidence is measured afresh as well.

A bucket's verdict rests on whole requests once ``COHORTS_TO_JUDGE`` cohorts that
speculated there have finished (vllm_cast.cohorts): speculating is slower while the mean
speedup of its recent cohorts is below 1 (or on its first one alone, when that one is
below ``CLEARLY_SLOWER`` and has ``DECIDING_MEMBERS`` requests). Until then the steps decide, and only against
speculation that measures under ``STRONGLY_SLOWER`` of plain decoding: a wave's first steps
read speculation far slower than it ends up (vllm_cast.cohorts), and a "slower" verdict
from them held for the rest of the batch size (greedy B=2, 64 tokens: the first MT-Bench
wave, 0.86x with every tree verified, kept eleven later waves plain, nine of which
speculation ran 1.3-1.5x faster).

A request decoding alone is judged on its own probes instead (vllm_cast.solo_probes); its
steps still add to the batch-size-1 bucket, whose verdict rules the larger buckets and the
solo requests that are not probed."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable

from vllm_cast.cohorts import CohortLedger
from vllm_cast.step_overheads import RecentWindows, batch_bucket

WINDOW_ENTRIES = 32
"""Recent entries per (bucket, mode, kind) whose tokens and seconds are pooled."""

MIN_STEPS = 4
"""Decode steps of a kind (emitting tokens) a bucket needs before its rate is compared. More
steps give steadier verdicts, but while speculation has no verdict the proposer's trees are
mostly declined (probes are rare), so a request stays drafted (its rows stashed each step) for
as long as that takes: 16 measured 0.85x of vanilla at T=1 B=1 against ~1.0x with 4."""

STALE_AFTER_PLAIN_STEPS = 1024
"""Plain steps after which a bucket's speculative samples are too old to keep CAST from
drafting there (the workload may have changed: other prompts, other acceptance), unless its
finished cohorts price the re-examination (``REEXAMINATION_LOSS``). Each time they go stale
the next wait doubles, up to ``LONGEST_STALE_AFTER``; it is back to the first once
speculating measures no slower than plain decoding (re-measuring drafts new prompts and
speculates for a few steps: repeated every 1024 steps it cost 5-15% of a 32-token workload
at B=16 where speculation never pays)."""

LONGEST_STALE_AFTER = 16 * STALE_AFTER_PLAIN_STEPS

REEXAMINATION_LOSS = 0.05
"""Share of the plain decoding since a "slower" verdict that re-examining it may cost, when
the verdict rests on finished cohorts: re-examining speculates on ``COHORTS_TO_JUDGE``
cohorts, each losing ``1 - s`` of its plain steps ``n`` (their mean speedup and slowest
requests' tokens), so the samples go stale after ``COHORTS_TO_JUDGE * (1 - s) * n /
REEXAMINATION_LOSS`` plain steps (then twice that, ...). Greedy B=4, 64 tokens: MT-Bench's
cohorts read 0.80-0.90 (wall clock 0.86x of vanilla), so the verdict formed on the grid's
first task is re-examined after ~6 waves, where a fixed 1024 steps kept every later task
plain (drafted, they read 0.92-1.39x in a session-27 run: GSM8K and qa 1.3-1.4x)."""

COHORTS_TO_JUDGE = 2
"""Completed cohorts that speculated a bucket needs before its verdict rests on them: one
wave is too few (greedy B=2: MT-Bench's first wave 0.86x, its second 1.32x), unless it
measured under ``CLEARLY_SLOWER``."""

CLEARLY_SLOWER = 0.8
"""A bucket's first completed cohort below this speedup decides alone (when it has
``DECIDING_MEMBERS`` requests). Greedy, 64 tokens, the
grid's cell order: the first cohorts of buckets where speculation went on to pay read
0.84-0.91x (B=2: MT-Bench, GSM8K, alpaca), those of buckets where it lost 0.73-0.88x (B=16:
0.73 and 0.78, B=8: 0.75, B=4: 0.85 and 0.88); waiting for a second B=16 cohort cost a second
wave at 0.78x, and the cell's median repeat read 0.75x of vanilla."""

DECIDING_MEMBERS = 4
"""Requests a first cohort needs to decide alone. One or two requests are one or two prompts'
luck: a lone warm-up request (MT-Bench's first prompt, greedy, 0.69x of plain decoding)
made the batch-size-1 bucket slower, which ruled every larger batch size, and the next
GSM8K waves at B=2 were never drafted (1.4-1.6x once drafted); at B=2 MT-Bench's first
wave reads 0.70-0.89x where its second reads 1.4-2.0x."""

STRONGLY_SLOWER = 0.5
"""Before a bucket has ``COHORTS_TO_JUDGE`` cohorts, speculating is slower only when its steps
measure under this share of plain decoding's tokens per second (sampled B=2 waves, 64
tokens, read 0.16-0.63 over their first steps where they ended 0.49-0.67x; greedy waves
that ended faster read 0.54 and up)."""


class RecentTotals(RecentWindows):
    """Per key, the last ``WINDOW_ENTRIES`` (tokens, seconds) entries and their pooled rate."""

    def __init__(self) -> None:
        super().__init__(WINDOW_ENTRIES)

    def rate(self, key: Hashable, min_steps: int = MIN_STEPS, pending: tuple[int, float] | None = None
             ) -> float | None:
        """Tokens per second over the window, or None while it holds fewer than
        ``min_steps`` entries that emitted tokens. ``pending``: one more (tokens, seconds)
        entry counted as if added (the window still keeps its last ``size``)."""
        window = self.windows.get(key, ())
        if pending is not None:
            window = [*window, pending][-self.size:]
        if not window or sum(1 for tokens, _ in window if tokens) < min_steps:
            return None
        return sum(tokens for tokens, _ in window) / sum(seconds for _, seconds in window)


class MeasuredThroughput:
    """Tokens per second of speculative and plain decoding (see module doc) per (bucket,
    mode, kind), pooled over each one's last ``WINDOW_ENTRIES`` entries, compared once both
    kinds have ``MIN_STEPS`` steps."""

    def __init__(self) -> None:
        self.rates = RecentTotals()
        self.decode_rates = RecentTotals()
        """Per (bucket, mode): speculative decode steps alone, without the draft's passes over
        new prompts (``decode_steps_faster``)."""
        self.cohorts = CohortLedger()
        self.plain_steps_since_speculative: Counter[tuple[int, bool]] = Counter()
        self.times_stale: Counter[tuple[int, bool]] = Counter()
        """Per (bucket, mode): times its samples went stale since speculating last measured
        no slower (each doubles the next wait, see ``_stale_wait``)."""
        self.verdicts: dict[tuple[int, bool], bool] = {}
        """Per (bucket, mode): whether speculating measured slower, as formed when both kinds
        were first measured after its last speculative sample (dropped by the next one)."""

    def record(self, batch_size: int, all_sampled: bool, speculative: bool, tokens: int, seconds: float,
               plain_steps: int = 1) -> bool:
        """One decode step that emitted ``tokens`` tokens (all requests) in ``seconds``; a
        plain one stands for ``plain_steps`` plain steps of its batch in the count that makes
        speculative samples stale (the runner measures one in a few steps of a batch whose
        requests are all undrafted). Returns whether this step made speculative samples stale
        (they were dropped)."""
        if seconds <= 0:
            return False
        key = (batch_bucket(batch_size), all_sampled)
        if speculative:
            self._add_speculative((tokens, seconds), *key)
            self.decode_rates.add(key, (tokens, seconds))
        else:
            self.rates.add((*key, False), (tokens, seconds))
        since = self.plain_steps_since_speculative[key] + plain_steps if not speculative else 0
        went_stale = since > 0 and since >= self._stale_wait(key)
        if went_stale:
            for smaller_or_same in range(key[0] + 1):
                self.rates.forget((smaller_or_same, all_sampled, True))
                self.decode_rates.forget((smaller_or_same, all_sampled))
                self.verdicts.pop((smaller_or_same, all_sampled), None)
                self.cohorts.forget((smaller_or_same, all_sampled))
            self.times_stale[key] += 1
            since = 0
        self.plain_steps_since_speculative[key] = since
        self._reset_wait_if_paying(key)
        return went_stale

    def _stale_wait(self, key: tuple[int, bool]) -> int:
        """Plain steps after which the (bucket, mode)'s speculative samples go stale: priced
        by its finished cohorts when they measured slower (``REEXAMINATION_LOSS``), else
        ``STALE_AFTER_PLAIN_STEPS``; doubled per ``times_stale``, at most ``LONGEST_STALE_AFTER``."""
        wait = STALE_AFTER_PLAIN_STEPS
        speedup = self.cohorts.mean_speedup(key, fewest=1)
        if speedup is not None and speedup < 1.0:
            wait = math.ceil(COHORTS_TO_JUDGE * (1.0 - speedup) * self.cohorts.mean_plain_steps(key) / REEXAMINATION_LOSS)
        return min(wait << self.times_stale[key], LONGEST_STALE_AFTER)

    def record_prompt_drafting(self, batch_size: int, all_sampled: bool, seconds: float,
                               accepted_drafts: int = 0) -> None:
        """Seconds the draft spent on a step that was not decode-only (new prompts' first
        pass): a cost of speculating that decode steps do not show, charged to it, with the
        draft tokens the step's decoding requests accepted (what speculating gained on it
        beyond plain decoding's one token per request) credited."""
        if seconds > 0:
            self._add_speculative((accepted_drafts, seconds), batch_bucket(batch_size), all_sampled)
            self._reset_wait_if_paying((batch_bucket(batch_size), all_sampled))

    def _add_speculative(self, entry: tuple[float, float], bucket: int, all_sampled: bool) -> None:
        """A speculative (tokens, seconds) entry; the bucket's verdict is formed afresh."""
        self.rates.add((bucket, all_sampled, True), entry)
        self.verdicts.pop((bucket, all_sampled), None)

    def _reset_wait_if_paying(self, key: tuple[int, bool]) -> None:
        """Back to the shortest stale wait once speculating measures no slower than plain
        decoding at this (bucket, mode)."""
        if self.times_stale[key] and self._slower(*key) is False:
            del self.times_stale[key]

    def retain(self, req_ids: list[str]) -> None:
        """Requests not in ``req_ids`` finished (or were preempted): cohorts they complete
        add their speedups (vllm_cast.cohorts)."""
        for key in self.cohorts.retain(req_ids):
            self._reset_wait_if_paying(key)

    def plain_rate(self, batch_size: int, all_sampled: bool) -> float | None:
        """Plain decoding's tokens per second at this batch size's bucket and mode (None:
        fewer than ``MIN_STEPS`` plain steps measured)."""
        return self.rates.rate((batch_bucket(batch_size), all_sampled, False))

    def decode_steps_faster(self, batch_size: int, all_sampled: bool) -> bool:
        """Whether speculative decode steps alone (``MIN_STEPS`` of them) measured more tokens
        per second than plain decoding at this batch size's bucket and mode. Requests whose
        prompts the draft has read already paid for that pass: while their decode steps gain,
        a "slower" verdict that charges those passes to speculation speaks only for new
        prompts (``prompts_paid`` of ``measured_slower`` and ``should_decline``). Greedy B=4, sum's
        1.2-1.6k-token prompts: the draft's passes over them (158 + 52 ms) read speculation
        under half of plain decoding's rate after three decode steps that emitted 12, 28 and 28
        tokens in 21-25 ms each (plain steps: 4 tokens in ~6.3 ms), and the four requests were
        undrafted with their prompt passes paid and none of the gain taken."""
        speculative = self.decode_rates.rate((batch_bucket(batch_size), all_sampled))
        plain = None if speculative is None else self.plain_rate(batch_size, all_sampled)
        return plain is not None and speculative > plain

    def _slower(self, bucket: int, all_sampled: bool) -> bool | None:
        """The bucket's own verdict: whether speculating measured slower than plain decoding:
        its recent cohorts' mean speedup below 1 once it has ``COHORTS_TO_JUDGE`` of them (or
        its first one of ``DECIDING_MEMBERS`` requests below ``CLEARLY_SLOWER``), else its speculative steps under ``STRONGLY_SLOWER`` of plain decoding's rate (None
        until both kinds of steps are measured there; then held until the next speculative
        sample, see module doc)."""
        key = (bucket, all_sampled)
        speedup = self.cohorts.mean_speedup(key, COHORTS_TO_JUDGE)
        if speedup is not None:
            return speedup < 1.0
        lone = self.cohorts.lone_speedup(key, DECIDING_MEMBERS)
        if lone is not None and lone < CLEARLY_SLOWER:
            return True
        if key not in self.verdicts:
            # Speculative first: on plain steps where nothing speculated (every plain step
            # asks, via _reset_wait_if_paying) the plain window is then never summed.
            speculative = self.rates.rate((bucket, all_sampled, True))
            plain = None if speculative is None else self.rates.rate((bucket, all_sampled, False))
            if plain is None:
                return None
            self.verdicts[key] = speculative < STRONGLY_SLOWER * plain
        return self.verdicts[key]

    def should_decline(self, batch_size: int, all_sampled: bool, prompts_paid: bool = False) -> bool:
        """Whether to decline speculation at this batch size and mode: it measured fewer
        tokens per second than plain decoding, or plain decoding was never measured here
        (explore it). False until speculative steps have ``MIN_STEPS`` samples, and, when
        ``prompts_paid`` (the draft has read every request's prompt), while speculative decode
        steps alone measure faster (``decode_steps_faster``)."""
        bucket = batch_bucket(batch_size)
        measured = self.rates.rate((bucket, all_sampled, True)) is not None
        return (measured and self._slower(bucket, all_sampled) is not False  # None: plain unmeasured
                and not (prompts_paid and self.decode_steps_faster(batch_size, all_sampled)))

    def measured_slower(self, batch_size: int, all_sampled: bool, prompts_paid: bool = False) -> bool:
        """Whether speculating measured slower at this batch size and mode: both kinds are
        measured in its bucket and speculating is slower, or its bucket has no verdict and
        the nearest smaller bucket with one measured speculating slower (see module doc;
        samples are dropped after ``_stale_wait`` plain steps, then after twice as many, ...).
        With ``prompts_paid`` (the draft has read every request's prompt), not while
        speculative decode steps alone measure faster (``decode_steps_faster``)."""
        for bucket in range(batch_bucket(batch_size), -1, -1):
            verdict = self._slower(bucket, all_sampled)
            if verdict is not None:
                return verdict and not (prompts_paid and self.decode_steps_faster(batch_size, all_sampled))
        return False

    def summary(self) -> dict[str, float]:
        """Pooled rates in tokens/s, keyed ``<spec|plain>_tps_b<bucket>[_sampled]``; the mean
        speedup of each bucket's recent finished cohorts, ``cohort_speedup_b<bucket>[_sampled]``;
        and each step verdict held now, ``step_verdict_slower_b<bucket>[_sampled]`` (1: slower).
        Read only: no verdict is formed by asking."""
        def suffix(bucket: int, sampled: bool) -> str:
            return f"_b{bucket}{'_sampled' if sampled else ''}"

        out = {}
        for bucket, sampled, speculative in self.rates.keys():
            rate = self.rates.rate((bucket, sampled, speculative), min_steps=1)
            if rate is not None:
                out[f"{'spec' if speculative else 'plain'}_tps{suffix(bucket, sampled)}"] = rate
        for key in sorted(self.cohorts.results):
            speedup = self.cohorts.mean_speedup(key, fewest=1)
            if speedup is not None:
                out[f"cohort_speedup{suffix(*key)}"] = speedup
        for key, slower in sorted(self.verdicts.items()):
            out[f"step_verdict_slower{suffix(*key)}"] = float(slower)
        return out
