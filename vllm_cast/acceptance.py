"""Online calibration of draft confidence into acceptance probability.

CAST (like EAGLE-2) values a node by the product of draft probabilities on its path,
assuming a draft probability approximates the chance the target accepts the token. A
draft head that is right but unconfident (flat distributions: typical of small heads,
and of greedy verification, where only the argmax matters) breaks that assumption and
makes trees too wide and too shallow. The calibrator learns, from the verification
outcomes vLLM already computes, the acceptance rate of a node given that its parent was
accepted, per (rank among siblings, draft-probability bin), shrunk towards the raw draft
probability by a Beta prior. It changes only tree shapes, never what is accepted, so
losslessness is untouched.

How predictable the target is also depends on the request (code and repeated text are
accepted far more often than open chat at the same draft confidence, and a head with flat
distributions shows no difference in its probabilities at all), so each request's
first-rank estimates are scaled by its own record: its accepted first-rank children over
the number the shared table expected of them, shrunk towards 1 by
``REQUEST_PRIOR_STRENGTH`` expected acceptances. The record is kept apart for the root's
children and for deeper nodes (``DEPTH_CLASSES``): the root's child is drafted from the
target's own hidden states, deeper ones from the draft's, and a request can be read right
at the first and wrong below it every step (see ``DEPTH_CLASSES``)."""

from __future__ import annotations

import bisect
import functools
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from vllm_cast.batch_rows import python_list, row_numbers

MIN_RATE_REQUESTS = 4
"""Finished requests whose own first-rank rates a mode's settled rate averages before
verdicts that can never be revised rest on it (``AcceptanceCalibrator.first_rank_rate``;
the last ``RECENT_REQUEST_RATES`` are kept): a request judged hopeless at that rate is never
drafted, so the rate cannot learn from it. Pooled over outcomes, one greedy warm-up request
(MT-Bench's first prompt: 64 outcomes at 0.57, where QA's requests read ~0.9) priced every
chain at B=4 as hopeless, and the QA and GSM8K waves that followed at B=4 were never drafted."""
RECENT_REQUEST_RATES = 8
"""Finished requests' rates kept per mode."""
DEPTH_CLASSES = 2
"""Per-request records kept apart: 0 for the root's children, 1 for deeper nodes. Pooled,
one greedy MT-Bench request whose first draft token was accepted on every step and its
second on none was estimated at 0.6 for the first and 0.35 for the first two; at B=2 the
batch's chains stayed 2 deep for it (each step 1.4 ms dearer than a 1-deep one, for no
token) while it decoded the most tokens of its batch."""
REQUEST_PRIOR_STRENGTH = 2.0
"""Expected first-rank acceptances a request's own record counts as before it moves its
estimates halfway to what it measured. A request's first steps are drafted with the
shared table's estimates, so the stronger this prior, the longer a request the draft
reads wrongly (confident, but rejected after a token or two) keeps getting deep trees.
Measured on the ``ci`` fixture, greedy, 64 tokens, twelve waves per batch size in one
process, summed per-wave speedup over vanilla, 8 / 3 / 2 / 1: B=2 with every tree verified
1.075 / 1.107 / 1.127 / 1.106-1.119, B=4 0.855 / 0.871 / 0.919 / 0.906-0.917, B=1 CAST as
configured 1.263-1.268 / 1.288 / 1.282 / 1.288. (Strength 8 was chosen in an earlier
session, when at B=1 a prior of 2 drove open-chat chains deeper than they were accepted.)"""
PROBABILITY_EDGES = torch.tensor([0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0000001])


Outcomes = list | np.ndarray | torch.Tensor
"""One value per recorded outcome ``[T]``."""


@functools.cache
def _rank_offsets(children: int, ranks: int, bins: int) -> np.ndarray:
    """``[K]`` offset of each sibling rank's row in a flattened ``[ranks, bins]`` table."""
    offsets = np.minimum(np.arange(children), ranks - 1) * bins
    offsets.flags.writeable = False
    return offsets


@functools.cache
def _rank_offset_tuple(children: int, ranks: int, bins: int) -> tuple[int, ...]:
    """:func:`_rank_offsets` as Python ints (the plain-Python paths)."""
    return tuple(_rank_offsets(children, ranks, bins).tolist())


class _RequestRecord:
    """One request's first-rank outcomes: accepted and expected (by the shared table) per
    depth class ``[DEPTH_CLASSES]``, their number over all classes, and its mode."""

    __slots__ = ("hits", "expected", "trials", "mode")

    def __init__(self, mode: int) -> None:
        self.hits = [0.0] * DEPTH_CLASSES
        self.expected = [0.0] * DEPTH_CLASSES
        self.trials = 0
        self.mode = mode


class AcceptanceCalibrator:
    """Acceptance estimates per (verification mode, sibling rank, probability bin). Modes:
    0 greedy, 1 sampled (acceptance under sampling is much lower for the same draft
    probability); ranks ``0..ranks-2`` each have their own row, higher ranks share the last."""

    MODES = 2

    def __init__(self, ranks: int = 4, prior_strength: float = 4.0,
                 request_prior_strength: float = REQUEST_PRIOR_STRENGTH) -> None:
        self.ranks = ranks
        self.prior_strength = prior_strength
        self._bins = PROBABILITY_EDGES.numel() - 1
        self._cells_per_mode = ranks * self._bins
        self._hits = [0.0] * (self.MODES * self._cells_per_mode)
        self._trials = [0.0] * (self.MODES * self._cells_per_mode)
        """Accepted and recorded outcomes per cell, flattened ``[MODES, ranks, bins]``: Python
        lists, because every step adds a few dozen outcomes one at a time and reads a few
        dozen cells back in the chain builder (each a numpy scalar access otherwise: with
        them the calibrator's share of a greedy B=4 step was ~0.1 ms)."""
        self._inner_edges = PROBABILITY_EDGES.double().numpy()[1:-1]
        """Bin boundaries between the first and last bin: a probability's bin is the number
        of them at or below it (0..bins-1, no clipping needed)."""
        self._inner_edge_list = self._inner_edges.tolist()
        """The same boundaries as Python floats (the plain-Python paths bisect them)."""
        self.request_prior_strength = request_prior_strength
        self.request_records: dict[str, _RequestRecord] = {}
        self.finished_request_rates = [deque(maxlen=RECENT_REQUEST_RATES) for _ in range(self.MODES)]
        """Per mode, the first-rank acceptance rates of the last finished requests that had
        first-rank outcomes (sampled requests are often undrafted after 1-3 of them: with 8
        or more required, the sampled rate never formed in the grid's T=1 B=1 cells)."""

    def _cell(self, rank: int, prob: float) -> int:
        """The (sibling rank, probability bin) cell of one draft probability in a mode's
        flattened ``[ranks, bins]`` table."""
        return min(rank, self.ranks - 1) * self._bins + bisect.bisect_right(self._inner_edge_list, prob)

    def _tables(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Accepted and recorded counts ``[B, ranks * bins]`` of each row's mode (``modes``
        ``[B]`` int: 0 greedy, 1 sampled)."""
        return tuple(np.array(table).reshape(self.MODES, -1)[modes] for table in (self._hits, self._trials))

    def __call__(self, sorted_probs: np.ndarray, sampled: np.ndarray) -> np.ndarray:
        """Estimated acceptance ``[B, ..., K]`` (float64) of children whose draft
        probabilities ``[B, ..., K]`` are sorted descending (position = sibling rank);
        ``sampled`` ``[B]`` bool: whether each request verifies by sampling (else greedy)."""
        return self.estimator(sampled)(sorted_probs)

    def estimator(self, sampled: np.ndarray, req_ids: list[str] | None = None
                  ) -> Callable[[np.ndarray, bool], np.ndarray]:
        """:meth:`__call__` for one step's batch: the per-request counts are looked up once
        here and the returned map ``(sorted_probs, deep=False) -> estimates`` (numpy in and
        out; it runs once per tree layer on tiny arrays) only bins the probabilities.
        ``req_ids`` ``[B]``: the batch's requests, whose first-rank estimates are scaled by
        their own records (see module doc), those of the root's children or, with ``deep``,
        of deeper nodes. Outcomes recorded later are not seen by it."""
        modes = np.asarray(sampled).astype(np.int64)
        bins = self._bins
        hits, trials = self._tables(modes)
        factor_list = self._request_factor_list(req_ids) if req_ids is not None and len(req_ids) == modes.size else None
        factors = None if factor_list is None else np.array(factor_list)

        def estimate(sorted_probs: np.ndarray, deep: bool = False) -> np.ndarray:
            probs = np.asarray(sorted_probs, dtype=np.float64)
            cells = _rank_offsets(probs.shape[-1], self.ranks, bins) + np.searchsorted(
                self._inner_edges, probs, side="right")
            rows = row_numbers(modes.size, probs.ndim)
            estimates = self._shrunk(hits[rows, cells], trials[rows, cells], probs)
            if factors is not None:
                first = estimates[..., 0] * factors[:, int(deep)].reshape(-1, *([1] * (probs.ndim - 2)))
                estimates[..., 0] = np.minimum(first, 1.0)
            return estimates

        return estimate

    def row_estimator(self, sampled: Outcomes, req_ids: list[str] | None = None
                      ) -> Callable[[int, list[float], bool], list[float]]:
        """:meth:`estimator` in plain Python, one request's siblings at a time: ``(batch row,
        draft probabilities of sibling ranks 0, 1, ... as floats, deep) -> their estimates``
        (``sampled`` ``[B]``: bools as a list, array or CPU tensor). The chain builder calls
        it once per request and layer right after a draft forward, where each numpy call on
        these few values costs several times its warm time (cold caches) and Python's float
        arithmetic does not. It reads the live tables (outcomes are recorded between steps,
        never while one drafts)."""
        mode_starts = [int(flag) * self._cells_per_mode for flag in python_list(sampled)]
        factor_list = (self._request_factor_list(req_ids) if req_ids is not None and len(req_ids) == len(mode_starts)
                       else None)
        hits, trials, prior, edges = self._hits, self._trials, self.prior_strength, self._inner_edge_list

        def estimate(row: int, probs: list[float], deep: bool) -> list[float]:
            offsets = _rank_offset_tuple(len(probs), self.ranks, self._bins)
            start = mode_starts[row]
            estimates = [(hits[cell] + prior * prob) / (trials[cell] + prior) for cell, prob in zip(
                [start + offset + bisect.bisect_right(edges, prob) for offset, prob in zip(offsets, probs)], probs)]
            if factor_list is not None:
                estimates[0] = min(estimates[0] * factor_list[row][deep], 1.0)
            return estimates

        return estimate

    def _shrunk(self, hits: np.ndarray | float, trials: np.ndarray | float, probs: np.ndarray | float) -> np.ndarray | float:
        """Acceptance estimates of cells with ``hits`` of ``trials`` outcomes, shrunk towards
        the raw draft probabilities ``probs`` by the Beta prior (same shapes; numpy arrays or
        Python floats)."""
        return (hits + self.prior_strength * probs) / (trials + self.prior_strength)

    def _request_factor_list(self, req_ids: list[str]) -> list[tuple[float, ...]] | None:
        """``[B, DEPTH_CLASSES]`` each request's accepted over expected first-rank children
        per depth class, shrunk towards 1 (None when no request has a record)."""
        records = [self.request_records.get(req_id) for req_id in req_ids]
        if not any(records):
            return None
        strength = self.request_prior_strength
        return [(1.0,) * DEPTH_CLASSES if record is None else tuple(
            (hits + strength) / (expected + strength) for hits, expected in zip(record.hits, record.expected))
            for record in records]

    def deep_scales(self, req_ids: list[str]) -> list[float] | None:
        """``[B]`` each request's factor on its deeper nodes (depth class 1, see
        :meth:`_request_factor_list`), capped at 1: how much less than the shared table its
        own record says they are accepted (None when no request has a record)."""
        factors = self._request_factor_list(req_ids)
        return None if factors is None else [min(factor[1], 1.0) for factor in factors]

    def retain(self, req_ids: list[str]) -> None:
        """Forget the records of requests not in ``req_ids`` (finished or preempted), keeping
        each one's first-rank rate for :meth:`first_rank_rate`."""
        kept = set(req_ids)
        if self.request_records.keys() <= kept:
            return
        for req_id, record in self.request_records.items():
            if req_id not in kept:
                self.finished_request_rates[record.mode].append(sum(record.hits) / record.trials)
        self.request_records = {r: record for r, record in self.request_records.items() if r in kept}

    def record(self, probs: Outcomes, ranks: Outcomes, accepted: Outcomes, sampled: Outcomes,
               owners: Outcomes | None = None, owner_ids: list[str] | None = None, deep: Outcomes | None = None) -> None:
        """Outcomes of nodes whose parent was accepted: draft probabilities ``[T]``, sibling
        ranks ``[T]``, whether the target accepted each ``[T]`` bool and whether its request
        verified by sampling ``[T]`` bool (lists, numpy arrays or CPU tensors); optionally
        each outcome's request as an index ``[T]`` into ``owner_ids`` (adds to that request's
        record) and whether each node lies below the root's children ``[T]`` bool (None: none
        does). In plain Python: a step records a few outcomes per request right after the
        target forward, where numpy's first calls are slow (see :meth:`row_estimator`)."""
        probs, ranks, accepted, sampled = (python_list(column) for column in (probs, ranks, accepted, sampled))
        cells = [int(mode) * self._cells_per_mode + self._cell(rank, prob) for prob, rank, mode in zip(probs, ranks, sampled)]
        if owners is not None and owner_ids is not None:
            depth_classes = [0] * len(cells) if deep is None else [int(flag) for flag in python_list(deep)]
            self._add_to_request_records(cells, probs, accepted, ranks, depth_classes, python_list(owners), owner_ids)
        trials, hits = self._trials, self._hits
        for cell, outcome in zip(cells, accepted):
            trials[cell] += 1.0
            hits[cell] += float(outcome)

    def _add_to_request_records(self, cells: list[int], probs: list[float], accepted: list, ranks: list[int],
                                depth_classes: list[int], owners: list[int], owner_ids: list[str]) -> None:
        """Add first-rank outcomes (table cells ``cells``, ``[T]`` like the other columns) to
        their requests' records in their depth classes, each expected as the shared table
        estimates it before this step's outcomes."""
        trials, hits = self._trials, self._hits
        records = self.request_records
        for cell, prob, outcome, rank, depth_class, owner in zip(cells, probs, accepted, ranks, depth_classes, owners):
            if rank == 0:
                req_id = owner_ids[owner]
                record = records.get(req_id)
                if record is None:
                    record = records[req_id] = _RequestRecord(cell // self._cells_per_mode)
                record.hits[depth_class] += float(outcome)
                record.expected[depth_class] += self._shrunk(hits[cell], trials[cell], prob)
                record.trials += 1

    def first_rank_rate(self, sampled: bool, best: bool = False) -> float | None:
        """The mean first-rank acceptance rate of one mode's last finished requests (each
        request's own, so a long one does not outweigh the rest), or with ``best`` the
        highest of them; None before ``MIN_RATE_REQUESTS`` have finished (recorded with their
        owners)."""
        rates = self.finished_request_rates[int(sampled)]
        if len(rates) < MIN_RATE_REQUESTS:
            return None
        return max(rates) if best else sum(rates) / len(rates)
