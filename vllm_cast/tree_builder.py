"""CAST's per-step tree construction for a batch: dynamic expansion with breadth and
depth pruning, then dynamic reranking (arXiv 2510.26577, sections 4.1-4.3).

The builder is engine independent: the caller runs the draft model and feeds it the
draft distributions layer by layer; the builder says which nodes to expand next and, at
the end, which nodes the target verifies. Shapes: ``B`` requests, ``V`` vocabulary, ``W``
frontier width, ``K`` = ``node_top_k``.

Node value = product of draft probabilities on the root path (EAGLE-2's confidence), or
of their calibrated acceptance estimates when a ``calibrate`` map is given.
Batch scope (the paper): utilities are averaged over the batch and one width per layer,
one depth and one verify count serve the whole batch. Request scope: widths and verify
counts per request (the draft forward still runs at the widest request's width).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.selection import batched_select_max_valid_index, select_max_valid_index
from vllm_cast.tree import FlatTree


@dataclass
class Frontier:
    """Nodes to expand with the next draft forward.

    tokens ``[B, W]`` int64; parent_slot ``[B, W]`` int64: index of each node's parent in
    the previous frontier (-1: the root); valid ``[B, W]`` bool (request-scope padding);
    pool_index ``[B, W]`` int64: position in the candidate pool (1-based, 0 = root)."""

    tokens: torch.Tensor
    parent_slot: torch.Tensor
    valid: torch.Tensor
    pool_index: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class StepDecision:
    """What CAST chose this step (for logs and metrics)."""

    widths: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    expected_accepted: float = 0.0
    predicted_draft_seconds: float = 0.0
    """Cost table's time for this step's draft passes (first pass + one per tree layer)."""
    predicted_verify_seconds: float = 0.0
    """Cost table's time for the target forward that verifies the largest tree."""
    draft_passes: int = 0
    """Draft forwards run this step (first pass + tree layers)."""
    declined: bool = False
    """The trees were dropped: with measured overheads, plain decoding was faster."""

    @property
    def depth(self) -> int:
        return len(self.widths)


class CastTreeBuilder:
    """One speculative step: ``start`` -> ``expand`` ... -> ``finish`` (see module doc)."""

    def __init__(self, params: CastParams, costs: StepCosts, max_nodes: int, ratio_history: deque | None = None,
                 calibrate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.params = params
        self.k = params.node_top_k
        self.per_request = params.decision_scope == "request"
        self.max_nodes = max_nodes
        self.draft_cost = costs.draft_ratio()
        self.target_cost = costs.target_ratio().numpy().astype(np.float64)
        self.chain_target_cost = costs.chain_target_ratio().numpy().astype(np.float64)
        if self.draft_cost.numel() <= self.k or self.target_cost.size <= max_nodes + 1:
            raise ValueError("cost curves must cover node_top_k draft tokens and max_nodes + 1 target tokens")
        self.ratios = ratio_history if ratio_history is not None else deque([1.0], maxlen=params.ratio_buffer_size)
        self.pool_tokens: list[torch.Tensor] = []
        self.pool_parents: list[torch.Tensor] = []
        self.pool_values: list[torch.Tensor] = []
        self.pool_draft_probs: list[torch.Tensor] = []
        self.pool_depths: list[int] = []
        """Tree depth of each pool candidate (1 = child of the root), in pool order."""
        self.calibrate = calibrate
        self.pool_size = 1  # the root
        self.frontier_values: torch.Tensor | None = None
        self.frontier: Frontier | None = None
        self.root_candidates: tuple[torch.Tensor, torch.Tensor] | None = None
        """Layer-1 candidates: tokens and draft probabilities ``[B, K]`` (by rank)."""
        self.prev_utility: float | None = None
        self.decision = StepDecision()

    def _children(self, distributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K children of each distribution ``[..., V]``: tokens and the factor each
        multiplies its parent's value by (draft probability, or its calibration)
        ``[..., K]``; records the raw draft probabilities for the pool."""
        probs, tokens = distributions.float().topk(self.k, dim=-1)
        self.pool_draft_probs.append(probs.reshape(probs.shape[0], -1))
        return tokens, probs if self.calibrate is None else self.calibrate(probs)

    def _add_candidates(self, tokens: torch.Tensor, values: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Append candidates ``[B, C]`` to the pool; return their pool indices ``[B, C]``."""
        count = tokens.shape[1]
        index = torch.arange(self.pool_size, self.pool_size + count).expand_as(tokens)
        self.pool_tokens.append(tokens)
        self.pool_values.append(values)
        self.pool_parents.append(parents)
        self.pool_depths += [len(self.decision.widths) + 1] * count
        self.pool_size += count
        return index

    def _prune_and_continue(self, tokens: torch.Tensor, values: torch.Tensor, parent_slot: torch.Tensor,
                            pool_index: torch.Tensor) -> Frontier | None:
        """Breadth-prune one layer's candidates ``[B, C]``; decide on depth; return the
        frontier to expand or None to stop drafting."""
        by_value = values.sort(dim=1, descending=True, stable=True).indices
        effective = torch.gather(self._expansion_values(values), 1, by_value)
        sorted_values, rank = effective.sort(dim=1, descending=True, stable=True)
        order = torch.gather(by_value, 1, rank)  # by counted value, ties by real value
        width_cap = min(self.k, values.shape[1])
        per_row = torch.cat([torch.zeros(values.shape[0], 1, dtype=torch.float64),
                             sorted_values[:, :width_cap].double().cumsum(1)], dim=1)
        cost = torch.cat([torch.zeros(1, dtype=torch.float64), self.draft_cost[1 : width_cap + 1]])
        batch_utility = per_row.mean(0)
        if self.per_request:
            widths = batched_select_max_valid_index(per_row, cost, self.params.breadth_threshold, base=1)
            width = int(widths.max())
        else:
            width = select_max_valid_index(batch_utility, cost, self.params.breadth_threshold, base=1)
            widths = torch.full((values.shape[0],), width, dtype=torch.int64)
        kept_utility = float(batch_utility[width])
        self.decision.widths.append(width)
        if self.prev_utility is not None and self.prev_utility > 0:
            self.ratios.append(kept_utility / self.prev_utility)
        self.prev_utility = kept_utility
        alpha = sum(self.ratios) / len(self.ratios)
        if len(self.decision.widths) >= self.params.max_depth:
            return None
        if alpha * kept_utility < self.params.depth_threshold * float(cost[width]):
            return None
        keep = order[:, :width]
        kept_values = torch.gather(values, 1, keep)
        valid = (torch.arange(width)[None, :] < widths[:, None]) & (kept_values > 0)
        self.frontier_values = kept_values * valid
        self.frontier = Frontier(
            tokens=torch.gather(tokens, 1, keep),
            parent_slot=torch.gather(parent_slot, 1, keep),
            valid=valid,
            pool_index=torch.gather(pool_index, 1, keep),
        )
        return self.frontier

    def _verify_cost(self, sorted_depths: np.ndarray) -> np.ndarray:
        """Target cost of verifying the first ``n`` nodes of each row, ``[B, n_max + 1]``,
        for pool depths sorted by value ``[B, n_max]``: the causal (chain) curve while those
        nodes form a chain (their deepest node is at depth ``n``), the tree curve after."""
        b, limit = sorted_depths.shape
        is_chain = np.ones((b, limit + 1), dtype=bool)
        is_chain[:, 1:] = np.maximum.accumulate(sorted_depths, axis=1) == np.arange(1, limit + 1)
        tree, chain = (curve[1 : limit + 2] - curve[1] for curve in (self.target_cost, self.chain_target_cost))
        return np.where(is_chain, chain, tree)

    def _verify_counts(self, sorted_pool: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Dynamic reranking's verify count per request ``[B]`` for a pool whose values
        are sorted descending ``[B, P]`` (``order``: their pool positions, 0-based), C3
        against the target cost of that many nodes (chain or tree, see ``_verify_cost``)."""
        b, pool = sorted_pool.shape
        limit = min(self.max_nodes, pool)
        values = sorted_pool[:, :limit].numpy().astype(np.float64)
        per_row = np.zeros((b, limit + 1))
        np.cumsum(values, axis=1, out=per_row[:, 1:])
        cost = self._verify_cost(np.asarray(self.pool_depths)[order[:, :limit].numpy()])
        if self.per_request:
            counts = batched_select_max_valid_index(per_row, cost, self.params.verify_threshold)
        else:
            count = select_max_valid_index(per_row.mean(0), cost.max(0), self.params.verify_threshold)
            counts = torch.full((b,), count, dtype=torch.int64)
        return torch.minimum(counts, torch.from_numpy((values > 0).sum(1)))

    def _expansion_values(self, values: torch.Tensor) -> torch.Tensor:
        """Values ``[B, C]`` of the newest layer as breadth/depth pruning counts them: all
        of them ("layer"), or only those inside the verify cut of the pool so far
        ("verified"; the rest count 0)."""
        if self.params.expansion_utility == "layer":
            return values
        pool, order = torch.cat(self.pool_values, dim=1).sort(dim=1, descending=True, stable=True)
        counts = self._verify_counts(pool, order)
        cut = torch.gather(pool, 1, (counts - 1).clamp_min(0)[:, None])
        return torch.where((values >= cut) & (counts[:, None] > 0), values, torch.zeros_like(values))

    def start(self, root_probs: torch.Tensor) -> Frontier | None:
        """Layer 1 from the draft distribution after the root, ``[B, V]``."""
        tokens, values = self._children(root_probs)
        self.root_candidates = (tokens, self.pool_draft_probs[0])
        parents = torch.zeros_like(tokens)
        pool_index = self._add_candidates(tokens, values, parents)
        return self._prune_and_continue(tokens, values, torch.full_like(tokens, -1), pool_index)

    def expand(self, child_probs: torch.Tensor) -> Frontier | None:
        """Next layer from the draft distributions at the frontier nodes, ``[B, W, V]``."""
        assert self.frontier is not None and self.frontier_values is not None
        b, w, _ = child_probs.shape
        tokens, probs = self._children(child_probs)
        values = (self.frontier_values[:, :, None] * probs).reshape(b, w * self.k)
        tokens = tokens.reshape(b, w * self.k)
        parents = self.frontier.pool_index[:, :, None].expand(b, w, self.k).reshape(b, w * self.k)
        parent_slot = torch.arange(w)[None, :, None].expand(b, w, self.k).reshape(b, w * self.k)
        pool_index = self._add_candidates(tokens, values, parents)
        return self._prune_and_continue(tokens, values, parent_slot, pool_index)

    def finish(self, root_tokens: torch.Tensor, max_nodes_per_request: torch.Tensor | None = None) -> list[FlatTree]:
        """Dynamic reranking: the verified trees, one per request (root first).

        root_tokens ``[B]``: each request's last verified token. max_nodes_per_request
        ``[B]`` optionally caps a request's draft nodes (e.g. near max_model_len)."""
        tokens = torch.cat(self.pool_tokens, dim=1)
        values = torch.cat(self.pool_values, dim=1)
        parents = torch.cat(self.pool_parents, dim=1)
        draft_probs = torch.cat(self.pool_draft_probs, dim=1)
        b = values.shape[0]
        sorted_values, order = values.sort(dim=1, descending=True, stable=True)
        counts = self._verify_counts(sorted_values, order)
        if max_nodes_per_request is not None:
            counts = torch.minimum(counts, max_nodes_per_request.clamp_min(0))
        trees = []
        for row in range(b):
            m = int(counts[row])
            chosen = order[row, :m].sort().values  # pool order: parents before children
            new_index = {0: 0}
            new_index.update({int(p) + 1: i + 1 for i, p in enumerate(chosen.tolist())})
            node_parents = [-1] + [new_index[int(parents[row, p])] for p in chosen.tolist()]
            trees.append(FlatTree(
                tokens=torch.cat([root_tokens[row : row + 1].long(), tokens[row, chosen]]),
                parents=torch.tensor(node_parents, dtype=torch.int64),
                values=torch.cat([torch.ones(1), values[row, chosen].float()]),
                draft_probs=torch.cat([torch.ones(1), draft_probs[row, chosen]]),
                ranks=torch.cat([torch.zeros(1, dtype=torch.int64), chosen % self.k]),
            ))
            self.decision.verified.append(m)
        self.decision.expected_accepted = float(sum(float(t.values[1:].sum()) for t in trees) / b)
        return trees
