"""Flattened draft trees.

A tree of ``N`` nodes is stored in topological (breadth-first) order: node 0 is the root
(the last verified token, whose successor the target predicts), and every node's parent
index is smaller than its own. Any prefix of such an order is again a tree, which is what
makes vLLM's truncation of draft-token lists safe. Batched trees are padded to ``N`` with
parent ``-1`` past each tree's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class FlatTree:
    """One request's tree. tokens/parents ``[N]`` int64 (root parent -1), values ``[N]``
    float (path value; root 1); optionally each node's own draft probability ``[N]`` and
    rank among its siblings ``[N]`` (for acceptance calibration)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    values: torch.Tensor
    draft_probs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def prefix(self, length: int) -> FlatTree:
        """The first ``length`` nodes (a valid tree by the topological order)."""
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:length]

        return FlatTree(self.tokens[:length], self.parents[:length], self.values[:length],
                        cut(self.draft_probs), cut(self.ranks))

    @classmethod
    def chain(cls, root_token: int, tokens: Sequence[int], values: Sequence[float], draft_probs: Sequence[float]) -> FlatTree:
        """A chain below ``root_token``: each node's token, path value and draft
        probability (``[D]`` each), every node its parent's first-ranked child."""
        depth = len(tokens)
        return cls(tokens=torch.tensor([root_token, *tokens], dtype=torch.int64), parents=torch.arange(-1, depth),
                   values=torch.tensor([1.0, *values], dtype=torch.float32),
                   draft_probs=torch.tensor([1.0, *draft_probs], dtype=torch.float32),
                   ranks=torch.zeros(depth + 1, dtype=torch.int64))

    @property
    def is_chain(self) -> bool:
        """Whether every node's parent is the node before it (causal attention verifies it)."""
        return bool(torch.equal(self.parents[1:], torch.arange(len(self) - 1)))

    @property
    def draft_tokens(self) -> list[int]:
        """Tokens of the non-root nodes in order: what vLLM receives as draft tokens."""
        return self.tokens[1:].tolist()


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
