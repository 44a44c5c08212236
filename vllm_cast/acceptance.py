"""Online calibration of draft confidence into acceptance probability.

CAST (like EAGLE-2) values a node by the product of draft probabilities on its path,
assuming a draft probability approximates the chance the target accepts the token. A
draft head that is right but unconfident (flat distributions: typical of small heads,
and of greedy verification, where only the argmax matters) breaks that assumption and
makes trees too wide and too shallow. The calibrator learns, from the verification
outcomes vLLM already computes, the acceptance rate of a node given that its parent was
accepted, per (rank among siblings, draft-probability bin), shrunk towards the raw draft
probability by a Beta prior. It changes only tree shapes, never what is accepted, so
losslessness is untouched."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

MIN_RATE_TRIALS = 32
"""First-rank outcomes needed before :meth:`AcceptanceCalibrator.first_rank_rate` answers."""
PROBABILITY_EDGES = torch.tensor([0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0000001])


@functools.cache
def _rank_offsets(children: int, ranks: int, bins: int) -> np.ndarray:
    """``[K]`` offset of each sibling rank's row in a flattened ``[ranks, bins]`` table."""
    offsets = np.minimum(np.arange(children), ranks - 1) * bins
    offsets.flags.writeable = False
    return offsets


@functools.cache
def _rows(batch: int, ndim: int) -> np.ndarray:
    """``[B, 1, ...]`` row numbers that index ``ndim``-dimensional per-request arrays."""
    rows = np.arange(batch).reshape(-1, *([1] * (ndim - 1)))
    rows.flags.writeable = False
    return rows


class AcceptanceCalibrator:
    """Acceptance estimates per (verification mode, sibling rank, probability bin). Modes:
    0 greedy, 1 sampled (acceptance under sampling is much lower for the same draft
    probability); ranks ``0..ranks-2`` each have their own row, higher ranks share the last."""

    MODES = 2

    def __init__(self, ranks: int = 4, prior_strength: float = 4.0) -> None:
        self.ranks = ranks
        self.prior_strength = prior_strength
        bins = PROBABILITY_EDGES.numel() - 1
        self.accepted = torch.zeros(self.MODES, ranks, bins, dtype=torch.float64)
        self.trials = torch.zeros(self.MODES, ranks, bins, dtype=torch.float64)
        self._inner_edges = PROBABILITY_EDGES.double().numpy()[1:-1]
        """Bin boundaries between the first and last bin: a probability's bin is the number
        of them at or below it (0..bins-1, no clipping needed)."""
        self._accepted_np, self._trials_np = self.accepted.numpy(), self.trials.numpy()  # views, same memory

    def _cells(self, probs: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rank and probability-bin cells of draft probabilities and sibling ranks."""
        return np.minimum(ranks, self.ranks - 1), np.searchsorted(self._inner_edges, probs, side="right")

    def __call__(self, sorted_probs: np.ndarray, sampled: np.ndarray) -> np.ndarray:
        """Estimated acceptance ``[B, ..., K]`` (float64) of children whose draft
        probabilities ``[B, ..., K]`` are sorted descending (position = sibling rank);
        ``sampled`` ``[B]`` bool: whether each request verifies by sampling (else greedy)."""
        return self.estimator(sampled)(sorted_probs)

    def estimator(self, sampled: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """:meth:`__call__` for one step's batch: the per-request counts are looked up once
        here and the returned map (numpy in and out; it runs once per tree layer on tiny
        arrays) only bins the probabilities. Outcomes recorded later are not seen by it."""
        modes = np.asarray(sampled).astype(np.int64)
        bins = self._trials_np.shape[2]
        hits = self._accepted_np[modes].reshape(modes.size, -1)  # [B, ranks * bins]
        denominators = self._trials_np[modes].reshape(modes.size, -1) + self.prior_strength

        def estimate(sorted_probs: np.ndarray) -> np.ndarray:
            probs = np.asarray(sorted_probs, dtype=np.float64)
            cells = _rank_offsets(probs.shape[-1], self.ranks, bins) + np.searchsorted(
                self._inner_edges, probs, side="right")
            rows = _rows(modes.size, probs.ndim)
            return (hits[rows, cells] + self.prior_strength * probs) / denominators[rows, cells]

        return estimate

    def record(self, probs: np.ndarray, ranks: np.ndarray, accepted: np.ndarray, sampled: np.ndarray) -> None:
        """Outcomes of nodes whose parent was accepted: draft probabilities ``[T]``, sibling
        ranks ``[T]``, whether the target accepted each ``[T]`` bool and whether its request
        verified by sampling ``[T]`` bool (numpy or CPU tensors)."""
        rank_cell, bin_cell = self._cells(np.asarray(probs, dtype=np.float64), np.asarray(ranks))
        flat = (np.asarray(sampled).astype(np.int64) * self.ranks + rank_cell) * self.trials.shape[2] + bin_cell
        np.add.at(self._trials_np.reshape(-1), flat, 1.0)
        np.add.at(self._accepted_np.reshape(-1), flat, np.asarray(accepted, dtype=np.float64))

    def first_rank_rate(self, sampled: bool) -> float | None:
        """Acceptance rate of first-rank children over all probabilities seen in one mode,
        or None before ``MIN_RATE_TRIALS`` outcomes."""
        trials = float(self.trials[int(sampled), 0].sum())
        return None if trials < MIN_RATE_TRIALS else float(self.accepted[int(sampled), 0].sum()) / trials
