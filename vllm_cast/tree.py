"""Flattened draft trees.

A tree of ``N`` nodes is stored in topological (breadth-first) order: node 0 is the root
(the last verified token, whose successor the target predicts), and every node's parent
index is smaller than its own. Any prefix of such an order is again a tree, which is what
makes vLLM's truncation of draft-token lists safe. Batched trees are padded to ``N`` with
parent ``-1`` past each tree's length.
"""

from __future__ import annotations

import functools
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

    @classmethod
    def chains(cls, root_tokens: list[int], tokens: list[list[int]], values: list[list[float]],
               draft_probs: list[list[float]], ranks: list[list[int]], lengths: list[int]) -> list[FlatTree]:
        """One chain below each request's root token ``[B]``: its nodes' tokens, path
        values, draft probabilities and sibling ranks ``[B, D]`` each (Python lists), in
        depth order, every node its predecessor's child; request ``b`` keeps its first
        ``lengths[b]`` nodes. Built from the lists in one ``torch.tensor`` per column
        (through numpy, with a slice per row and column, it took ~40 us at B=4)."""
        batch = len(lengths)
        columns = [torch.tensor([[root, *row] for root, row in zip(roots, rows)], dtype=dtype) for roots, rows, dtype in (
            (root_tokens, tokens, torch.int64), ([1.0] * batch, values, torch.float32),
            ([1.0] * batch, draft_probs, torch.float32), ([0] * batch, ranks, torch.int64))]
        parents = chain_parents(columns[0].shape[1])
        if lengths and min(lengths) == max(lengths):  # one unbind per column instead of a slice per row
            n = lengths[0] + 1
            return [cls(row_tokens, parents[:n], row_values, row_probs, row_ranks, chain=True)
                    for row_tokens, row_values, row_probs, row_ranks in zip(*(column[:, :n].unbind(0)
                                                                              for column in columns))]
        return [cls(columns[0][row, : n + 1], parents[: n + 1], columns[1][row, : n + 1], columns[2][row, : n + 1],
                    columns[3][row, : n + 1], chain=True) for row, n in enumerate(lengths)]

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


@functools.lru_cache(maxsize=64)
def chain_parents(nodes: int) -> torch.Tensor:
    """Parents ``[nodes]`` of a chain (-1, 0, 1, ...), shared by every chain of that many
    nodes (trees never modify their parents; a new ``arange`` took ~10 us a step)."""
    return torch.arange(-1, nodes - 1)


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
