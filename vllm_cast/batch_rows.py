"""Helpers for the small per-request arrays CAST handles every step: cached row numbers for
indexing them (the tree builder and the acceptance calibrator gather ``values[rows,
columns]`` every tree layer) and their conversion to Python lists (plain Python beats numpy
and torch's per-call overhead at these sizes)."""

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


def python_list(values, dtype: type | None = None) -> list:
    """A 1-D array, tensor or list as a list of Python numbers (as ``dtype`` when given; a
    list is returned as it is)."""
    return values if isinstance(values, list) else np.asarray(values, dtype=dtype).tolist()
