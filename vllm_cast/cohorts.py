"""Speculation judged on whole requests: each cohort's wave speedup, measured when its last
request finishes.

Requests that start decoding together (an offline batch's wave; under a server, the one or
few requests that arrive together) form a cohort. A cohort is done when its last request
is: speculation pays for it only if that request finishes sooner than plain decoding would
have finished it. Per request the ledger adds up, over the steps it is in the batch, the
seconds those steps took (and the draft's passes over prompts on steps that were not
decode-only) and the seconds plain decoding would have taken to emit the same tokens (one
token per plain step at the step's batch size). A cohort's speedup is the ratio of the
largest of each: its slowest request's.

Judging on early steps failed: measured over a wave's first 4-8 speculative steps, at its
slowest request's pace, speculation read 0.32-0.90 of plain decoding on waves where it was
1.26-1.50x faster in the end (greedy B=2, 64 tokens: the draft's pass over the new
prompts, the requests' first trees drafted before their own acceptance was known, and a
slow start of one request that caught up later); counted pooled over the batch instead,
B=4 waves read 1.1-1.4x where they ended 0.74-0.86x (three requests done early, the fourth
decoding on)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vllm_cast.step_overheads import batch_bucket

COHORT_WINDOW = 8
"""Completed cohorts per (bucket, mode) whose speedups are averaged."""


@dataclass(frozen=True)
class CohortResult:
    """A completed cohort that speculated."""

    speedup: float
    """Plain decoding's seconds for its slowest request's tokens over that request's seconds
    in the batch."""
    members: int
    """Requests it started with."""
    plain_steps: int
    """Tokens of its member with the most: the steps plain decoding needed for the cohort."""


@dataclass
class _Cohort:
    key: tuple[int, bool]
    """(batch-size bucket, all sampled) of the step the cohort started decoding in."""
    running: int
    """Members not finished yet."""
    members: int = 0
    """Requests it started with."""
    speculated: bool = False
    slowest_seconds: float = 0.0
    """Largest seconds in the batch of a finished member."""
    slowest_plain_seconds: float = 0.0
    """Largest plain-decoding seconds of a finished member's tokens."""
    most_tokens: int = 0
    """Most tokens of a finished member (counted as plain decoding's steps)."""


@dataclass
class _Life:
    cohort: _Cohort
    seconds: float = 0.0
    plain_seconds: float = 0.0
    tokens: int = 0
    """Tokens charged to plain decoding (its steps for them)."""


@dataclass
class CohortLedger:
    """Per drafted request, its seconds in the batch against plain decoding's for its
    tokens; per (bucket, mode), the speedups of the last ``COHORT_WINDOW`` completed
    cohorts that speculated (see module doc)."""

    lives: dict[str, _Life] = field(default_factory=dict)
    results: dict[tuple[int, bool], deque[CohortResult]] = field(default_factory=dict)

    def record_step(self, req_ids: list[str], joining: list[bool], emitted: list[int], seconds: float,
                    plain_step_seconds: float, speculative: bool, all_sampled: bool) -> None:
        """One decode-only step of the batch ``req_ids`` ``[B]``: each request's ``emitted``
        tokens ``[B]`` in ``seconds``, against ``plain_step_seconds`` per token; requests
        not in the ledger whose ``joining`` flag ``[B]`` is set (drafted ones) start a cohort
        together, keyed by this batch's size."""
        self._join(req_ids, joining, all_sampled)
        self._charge(req_ids, emitted, seconds, plain_step_seconds, speculative)

    def record_prompt_step(self, req_ids: list[str], joining: list[bool], emitted: list[int], drafting_seconds: float,
                           plain_step_seconds: float, all_sampled: bool) -> None:
        """A step that was not decode-only (new prompts): its draft passes, ``drafting_seconds``,
        delay every request in it; the draft tokens the decoding ones accepted (``emitted``
        less one each) are what plain decoding would have needed extra steps for. Arguments
        as :meth:`record_step`'s."""
        self._join(req_ids, joining, all_sampled)
        self._charge(req_ids, [tokens - 1 for tokens in emitted], drafting_seconds, plain_step_seconds,
                     drafting_seconds > 0)

    def _charge(self, req_ids: list[str], plain_tokens: list[int], seconds: float, plain_step_seconds: float,
                speculative: bool) -> None:
        """Add ``seconds`` to each tracked request's time in the batch and its
        ``plain_tokens`` ``[B]`` at ``plain_step_seconds`` each to its plain-decoding time."""
        for req_id, tokens in zip(req_ids, plain_tokens):
            life = self.lives.get(req_id)
            if life is not None:
                life.seconds += seconds
                life.plain_seconds += tokens * plain_step_seconds
                life.tokens += tokens
                life.cohort.speculated |= speculative

    def _join(self, req_ids: list[str], joining: list[bool], all_sampled: bool) -> None:
        """Start one cohort of the joining requests not in the ledger yet."""
        new = [req_id for req_id, joins in zip(req_ids, joining) if joins and req_id not in self.lives]
        if new:
            cohort = _Cohort(key=(batch_bucket(len(req_ids)), all_sampled), running=len(new), members=len(new))
            self.lives.update((req_id, _Life(cohort)) for req_id in new)

    def retain(self, req_ids: list[str]) -> list[tuple[int, bool]]:
        """Close the lives of requests not in ``req_ids`` (finished or preempted); returns the
        keys of cohorts completed by it that speculated (their speedups are added)."""
        kept = set(req_ids)
        completed = []
        for req_id in [req_id for req_id in self.lives if req_id not in kept]:
            life = self.lives.pop(req_id)
            cohort = life.cohort
            cohort.slowest_seconds = max(cohort.slowest_seconds, life.seconds)
            cohort.slowest_plain_seconds = max(cohort.slowest_plain_seconds, life.plain_seconds)
            cohort.most_tokens = max(cohort.most_tokens, life.tokens)
            cohort.running -= 1
            if cohort.running == 0 and cohort.speculated and cohort.slowest_seconds > 0:
                self.results.setdefault(cohort.key, deque(maxlen=COHORT_WINDOW)).append(CohortResult(
                    cohort.slowest_plain_seconds / cohort.slowest_seconds, cohort.members, cohort.most_tokens))
                completed.append(cohort.key)
        return completed

    def mean_speedup(self, key: tuple[int, bool], fewest: int) -> float | None:
        """Mean speedup of the bucket's recent completed cohorts (None: fewer than ``fewest``)."""
        window = self.results.get(key)
        if not window or len(window) < fewest:
            return None
        return sum(result.speedup for result in window) / len(window)

    def mean_plain_steps(self, key: tuple[int, bool]) -> float | None:
        """Mean plain-decoding steps of the bucket's recent completed cohorts (None: none)."""
        window = self.results.get(key)
        return sum(result.plain_steps for result in window) / len(window) if window else None

    def lone_speedup(self, key: tuple[int, bool], fewest_members: int) -> float | None:
        """The speedup of the bucket's only completed cohort, if it has ``fewest_members``
        requests or more (None otherwise, or with no or several cohorts)."""
        window = self.results.get(key)
        if not window or len(window) != 1 or window[0].members < fewest_members:
            return None
        return window[0].speedup

    def forget(self, key: tuple[int, bool]) -> None:
        """Drop a bucket's completed cohorts (their evidence went stale)."""
        self.results.pop(key, None)
