"""Flattened draft trees.

A tree of ``N`` nodes is stored in topological (breadth-first) order: node 0 is the root
(the last verified token, whose successor the target predicts), and every node's parent
index is smaller than its own. Any prefix of such an order is again a tree, which is what
makes vLLM's truncation of draft-token lists safe. Batched trees are padded to ``N`` with
parent ``-1`` past each tree's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FlatTree:
    """One request's tree. tokens/parents ``[N]`` int64 (root parent -1), values ``[N]``
    float (path value; root 1); optionally each node's own draft probability ``[N]`` and
    rank among its siblings ``[N]`` (for acceptance calibration), and whether it is known
    to be a chain (None: read from ``parents`` when asked)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    values: torch.Tensor
    draft_probs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    chain: bool | None = None

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def prefix(self, length: int) -> FlatTree:
        """The first ``length`` nodes (a valid tree by the topological order)."""
        if length >= len(self):
            return self

        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:length]

        return FlatTree(self.tokens[:length], self.parents[:length], self.values[:length],
                        cut(self.draft_probs), cut(self.ranks), chain=True if self.chain else None)

    @property
    def is_chain(self) -> bool:
        """Whether every node's parent is the node before it (causal attention verifies it)."""
        if self.chain is not None:
            return self.chain
        return bool(torch.equal(self.parents[1:], torch.arange(len(self) - 1)))

    @property
    def draft_tokens(self) -> list[int]:
        """Tokens of the non-root nodes in order: what vLLM receives as draft tokens."""
        return self.tokens[1:].tolist()

    def parent_list(self) -> list[int]:
        """``parents`` as a list."""
        return self.parents.tolist()

    def calibration_nodes(self) -> tuple[list[int], list[float], list[int]] | None:
        """Each node's parent, draft probability and sibling rank (lists ``[N]``), or None
        for a tree built without them."""
        if self.draft_probs is None or self.ranks is None:
            return None
        return self.parents.tolist(), self.draft_probs.tolist(), self.ranks.tolist()


@dataclass
class DraftChain:
    """One request's chain (every node the previous one's child) as Python lists, root
    first: tokens ``[N]``, path values ``[N]`` (root 1), each node's draft probability
    (root 1) and sibling rank (root 0) ``[N]``. Chain steps return these in place of
    :class:`FlatTree` (read the same way: ``len``, ``prefix``, ``is_chain``,
    ``draft_tokens``, ``parent_list``, ``calibration_nodes``): the chain builder holds lists,
    and as tensors its chains took ~40 us a step at greedy B=4, then were read back as
    lists by every consumer."""

    tokens: list[int]
    values: list[float]
    draft_probs: list[float]
    ranks: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def batch(cls, root_tokens: list[int], tokens: list[list[int]], values: list[list[float]],
              draft_probs: list[list[float]], ranks: list[list[int]], lengths: list[int]) -> list[DraftChain]:
        """One chain below each request's root token ``[B]`` from its nodes' tokens, path
        values, draft probabilities and sibling ranks ``[B, D]`` each, in depth order;
        request ``b`` keeps its first ``lengths[b]`` nodes."""
        return [cls([root, *row_tokens[:n]], [1.0, *row_values[:n]], [1.0, *row_probs[:n]], [0, *row_ranks[:n]])
                for root, row_tokens, row_values, row_probs, row_ranks, n
                in zip(root_tokens, tokens, values, draft_probs, ranks, lengths)]

    def prefix(self, length: int) -> DraftChain:
        """The first ``length`` nodes."""
        if length >= len(self):
            return self
        return DraftChain(self.tokens[:length], self.values[:length], self.draft_probs[:length], self.ranks[:length])

    @property
    def is_chain(self) -> bool:
        return True

    @property
    def draft_tokens(self) -> list[int]:
        """Tokens of the non-root nodes in order: what vLLM receives as draft tokens."""
        return self.tokens[1:]

    def parent_list(self) -> list[int]:
        """Parents ``[N]``: -1, 0, 1, ..."""
        return list(range(-1, len(self.tokens) - 1))

    def calibration_nodes(self) -> tuple[list[int], list[float], list[int]]:
        """Each node's parent, draft probability and sibling rank (lists ``[N]``)."""
        return self.parent_list(), self.draft_probs, self.ranks


DraftTree = FlatTree | DraftChain
"""What a drafting step hands the runner per request."""


def with_root(root_value, columns: np.ndarray, dtype) -> torch.Tensor:
    """Per-request node columns ``[B, N]`` with the root's entry ``root_value`` (a scalar or
    ``[B]``) in front, ``[B, N + 1]`` of ``dtype``."""
    rows = np.empty((columns.shape[0], columns.shape[1] + 1), dtype=dtype)
    rows[:, 0] = root_value
    rows[:, 1:] = columns
    return torch.from_numpy(rows)


def check_topological(parents: torch.Tensor) -> None:
    """Raise ValueError unless ``parents`` ``[N]`` is a rooted tree in topological order."""
    if parents.numel() == 0 or int(parents[0]) != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    idx = torch.arange(parents.numel())
    if not ((parents[1:] >= 0) & (parents[1:] < idx[1:])).all():
        raise ValueError("every non-root node's parent must precede it")


def depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (root 0), ``[N]`` int64, for a topologically ordered tree."""
    out = torch.zeros_like(parents)
    for i in range(1, parents.numel()):
        out[i] = out[parents[i]] + 1
    return out


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool: row i is True at i and at each ancestor of i (the tree attention
    mask: node i may attend to those nodes, plus the whole cached context)."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def batched_ancestor_mask(parents: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` ancestor masks of padded trees ``parents`` ``[B, N]`` (rows and
    columns past ``lengths[b]`` are False), computed with ``depth`` vectorised steps."""
    b, n = parents.shape
    valid = torch.arange(n)[None, :] < lengths[:, None]
    mask = torch.eye(n, dtype=torch.bool).expand(b, n, n) & valid[:, :, None]
    safe_parents = parents.clamp_min(0)
    # mask <- mask | mask[parent]; after d rounds every ancestor within d levels is set.
    for _ in range(n):
        parent_rows = torch.gather(mask, 1, safe_parents[:, :, None].expand(b, n, n))
        grown = mask | (parent_rows & (parents >= 0)[:, :, None] & valid[:, :, None])
        if torch.equal(grown, mask):
            break
        mask = grown
    return mask


def root_to_leaf_paths(parents: torch.Tensor) -> torch.Tensor:
    """``[L, D+1]`` node indices of every root-to-leaf path (padded with -1), leaves in
    node order."""
    n = parents.numel()
    is_parent = torch.zeros(n, dtype=torch.bool)
    is_parent[parents[1:]] = True
    paths = [path_to(parents, leaf) for leaf in range(n) if not is_parent[leaf]]
    width = max(len(p) for p in paths)
    return torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.int64)


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Node indices from the root to ``node`` inclusive."""
    path = []
    while node != -1:
        path.append(node)
        node = int(parents[node])
    return path[::-1]
