"""Which requests of one forward attend with a tree mask, handed from the runner (target
verification) or the proposer (tree drafting) to the attention metadata builders.

The plan is installed with :func:`active_plan` around the metadata ``build`` calls of one
forward; builders copy it into the metadata they return, so the forward itself reads it
from its attention metadata and no global state is live while models run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeRequest:
    """One request's tree-shaped queries.

    batch_index: the request's row in the forward's batch (its ``query_start_loc`` slot).
    prefix_len: keys at logical positions ``[0, prefix_len)`` are visible to every query.
    mask ``[Q, M]`` bool: query ``i`` may see key ``prefix_len + j`` iff ``mask[i, j]``;
    ``Q`` is the request's query count and ``prefix_len + M`` its sequence length."""

    batch_index: int
    prefix_len: int
    mask: torch.Tensor


@dataclass(frozen=True)
class TreePlan:
    """The tree-shaped requests of one forward (others keep causal attention)."""

    requests: tuple[TreeRequest, ...]

    def __bool__(self) -> bool:
        return bool(self.requests)


_current: TreePlan | None = None


@contextlib.contextmanager
def active_plan(plan: TreePlan | None) -> Iterator[None]:
    """Make ``plan`` visible to attention metadata builders inside the block."""
    global _current
    previous, _current = _current, plan
    try:
        yield
    finally:
        _current = previous


def current_plan() -> TreePlan | None:
    """The plan installed by the innermost :func:`active_plan`, if any."""
    return _current
