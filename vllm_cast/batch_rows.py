"""Cached row numbers for indexing small per-request numpy arrays (the tree builder and the
acceptance calibrator gather ``values[rows, columns]`` every tree layer)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def row_numbers(batch: int, ndim: int = 2) -> np.ndarray:
    """``[B, 1, ...]`` (``ndim`` dimensions) row numbers that index ``ndim``-dimensional
    per-request arrays; read-only, cached per shape."""
    rows = np.arange(batch).reshape(-1, *([1] * (ndim - 1)))
    rows.flags.writeable = False
    return rows
