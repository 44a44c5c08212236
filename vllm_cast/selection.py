"""CAST's Algorithm 1, "Select Maximum Valid Index".

Given increasing utilities ``u[0..n]`` and costs ``c[0..n]`` it walks k upwards from a
base index, accepting k while the utility gained since the last accepted index is worth
at least ``threshold`` per unit of extra cost. Measured costs can be non-monotone (tile
padding), so they are replaced by their running maximum first.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_cast.batch_rows import python_list

TIE_TOLERANCE = 1e-9
"""Relative slack so exact ties (Theorem 4.1's boundary) survive float64 rounding."""

Curve = torch.Tensor | np.ndarray | list[float]
"""A 1-D (or, batched, 2-D) float curve on the CPU; numpy or plain lists are used for
speed on the tiny per-step curves (torch's per-op overhead dominates at these sizes)."""


def select_max_valid_index(utility: Curve, cost: Curve, threshold: float, base: int = 0) -> int:
    """Largest index reachable by accepted steps from ``base``.

    utility, cost: 1-D float curves of equal length (index = number of items kept); the
    cost is read as its running maximum (see module doc).
    Step ``anchor -> k`` is accepted when ``u[k] > u[anchor]`` and
    ``u[k] - u[anchor] >= threshold * (c[k] - c[anchor])``; later steps are measured from
    the last accepted index, which makes the rule robust to locally non-concave utility.
    Returns an index in ``[base, len(utility) - 1]``."""
    u, c = python_list(utility, np.float64), python_list(cost, np.float64)
    slack = threshold * (1 - TIE_TOLERANCE)
    anchor = base
    u_anchor = u[base]
    c_running = max(c[: base + 1])
    c_anchor = c_running
    for k in range(base + 1, len(u)):
        if c[k] > c_running:
            c_running = c[k]
        gain = u[k] - u_anchor
        if gain > 0 and gain >= slack * (c_running - c_anchor):
            anchor, u_anchor, c_anchor = k, u[k], c_running
    return anchor


def batched_select_max_valid_index(utility: Curve, cost: Curve, threshold: float, base: int = 0) -> np.ndarray:
    """:func:`select_max_valid_index` for each row of ``utility`` ``[R, n+1]`` against one
    cost curve ``[n+1]`` or one per row ``[R, n+1]``. Returns int64 ``[R]``."""
    rows = np.asarray(utility, dtype=np.float64)
    costs = np.broadcast_to(np.asarray(cost, dtype=np.float64), rows.shape)
    return np.array([select_max_valid_index(row, row_cost, threshold, base)
                     for row, row_cost in zip(rows.tolist(), costs.tolist())], dtype=np.int64)
