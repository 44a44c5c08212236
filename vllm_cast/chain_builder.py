"""CAST's rules applied to chains, for the steps after the tree builder chose a chain.

Where CAST's trees keep coming out as chains (one node per layer and request: the usual
shape at small batch sizes on a draft head with peaked distributions), most of the tree
builder's per-layer work only confirms it: the candidate pool, its sort and verify cut,
the frontier's bookkeeping. On the 2-core CPU that cost 0.66 ms of a 7.7 ms step at greedy
B=1, where a step of vLLM's chain drafting the same 4-deep chains took 6.4 ms.

:class:`CastChainBuilder` keeps each request's most valuable child per layer (its value
the product of calibrated estimates, as in the tree builder) and applies the same depth
rule (C2, :class:`~vllm_cast.tree_builder.LayerRules`, the layer's utility read as the
tree builder reads it) and verify rule (C3, against the
causal verification curve). The breadth rule (C1) is still evaluated on every layer's
children, counted as the tree builder counts them (those at or above each request's
verify cut of the chain so far): where it would keep more than one child,
``wanted_width`` is set and the proposer drafts trees again from the next step. Siblings
are not verify candidates, so a chain step never verifies one; the proposer therefore
also returns to the tree builder every ``CHAIN_STEPS`` steps. Batch scope only (one depth
and verify count for the whole batch).

It runs in plain Python over ``B x K`` floats per layer. It runs right after each draft
forward, when numpy's first calls are cold: on the 2-core Xeon the same 15 numpy calls on
8 values took 44-47 us there against 15 us warm, and their Python equivalent 17 us."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.selection import select_max_valid_index
from vllm_cast.tree import DraftChain
from vllm_cast.tree_builder import Frontier, LayerRules

CHAIN_STEPS = 16
"""Steps drafted as chains after a tree step whose trees were all chains, before the tree
builder decides again."""

RowCalibration = Callable[[int, list[float], bool], list[float]]
"""(batch row, draft probabilities of sibling ranks 0, 1, ..., whether they lie below the
root's children) -> acceptance estimates."""


class CastChainBuilder(LayerRules):
    """One speculative step of chains: ``start_top`` -> ``expand_top`` ... -> ``finish``,
    the tree builder's interface (see module doc). Shapes: ``B`` requests, ``K`` =
    ``node_top_k``, ``D`` layers so far."""

    def __init__(self, params: CastParams, costs: StepCosts, max_nodes: int, ratio_history: deque | None = None,
                 calibrate_row: RowCalibration | None = None, first_pass_cost: float = 0.0,
                 deep_scales: list[float] | None = None) -> None:
        """``calibrate_row``: one request's sibling probabilities -> acceptance estimates
        (None: the probabilities themselves); other arguments as :class:`LayerRules`'."""
        super().__init__(params, costs, max_nodes, ratio_history, first_pass_cost, deep_scales)
        if self.per_request:
            raise ValueError("chains are drafted with decision_scope 'batch' only")
        self.calibrate_row = calibrate_row
        self.node_values: list[list[float]] = []
        self.node_probs: list[list[float]] = []
        self.node_tokens: list[list[int]] = []
        self.node_ranks: list[list[int]] = []
        """Per request, its chain nodes' values, draft probabilities, tokens and sibling ranks, by depth."""
        self.chain_utility = [0.0]
        """Expected tokens of verifying the chain's first ``n`` layers (batch mean), per ``n``."""
        self.chain_verify_cost, self.tree_verify_cost = ([0.0, *self.added_verify_cost[chain].tolist()] for chain in (True, False))
        """Target cost of verifying ``n`` nodes beyond the root as a chain and as a tree, per ``n`` (plain-step units)."""
        self.wanted_width = False
        """Whether the breadth rule would have kept more than one child on some layer."""
        self._frontier: Frontier | None = None

    def start_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        """Layer 1 from the root's top-K draft probabilities (float64) and tokens (int64), ``[B, K]``."""
        self.root_candidates = (tokens, probs)
        batch = probs.shape[0]
        for per_request in (self.node_values, self.node_probs, self.node_tokens, self.node_ranks):
            per_request.extend([] for _ in range(batch))
        return self._extend(probs.tolist(), tokens.tolist())

    def expand_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        """Next layer from the chain nodes' top-K draft probabilities and tokens, ``[B, 1, K]``."""
        return self._extend(probs[:, 0].tolist(), tokens[:, 0].tolist())

    def _extend(self, probs: list[list[float]], tokens: list[list[int]]) -> Frontier | None:
        """Keep each request's most valuable child of its chain's newest node (the root on
        layer 1), from the children's draft probabilities and tokens (``B`` lists of
        ``K``); check breadth, decide on depth; return the next layer's frontier
        (``[B, 1]``) or None to stop drafting."""
        layer = len(self.chain_utility) - 1
        sorted_children = []
        for row, (row_probs, row_tokens) in enumerate(zip(probs, tokens)):
            parent = self.node_values[row][-1] if layer else 1.0
            factors = row_probs if self.calibrate_row is None else self.calibrate_row(row, row_probs, layer > 0)
            values = [parent * factor for factor in factors]
            order = sorted(range(len(values)), key=values.__getitem__, reverse=True)  # stable: ties by rank
            best = order[0]
            self.node_values[row].append(values[best])
            self.node_probs[row].append(row_probs[best])
            self.node_tokens[row].append(row_tokens[best])
            self.node_ranks[row].append(best)
            sorted_children.append([values[index] for index in order])
        batch = len(sorted_children)
        self.chain_utility.append(self.chain_utility[-1] + sum(row[0] for row in sorted_children) / batch)
        counted = self._counted_mean(sorted_children)
        breadth_utility = [0.0]
        for value in counted:
            breadth_utility.append(breadth_utility[-1] + value)
        if select_max_valid_index(breadth_utility, self.breadth_cost, self.params.breadth_threshold, base=1) > 1:
            self.wanted_width = True
        slowest = self.params.batch_utility == "slowest" and counted[0] > 0
        depth_utility = min(row[0] for row in sorted_children) if slowest else breadth_utility[1]
        next_base = None
        if slowest and self.deep_scales is not None:
            next_base = min(row[0] * scale for row, scale in zip(sorted_children, self.deep_scales))
        if not self._keeps_drafting(1, depth_utility, next_base):
            return None
        if self._frontier is None:  # built once a second layer is drafted (a 1-deep step needs none)
            batch = len(self.node_tokens)
            self._frontier = Frontier(tokens=np.empty((batch, 1), dtype=np.int64),
                                      parent_slot=np.zeros((batch, 1), dtype=np.int64),
                                      valid=np.ones((batch, 1), dtype=bool), pool_index=np.zeros((batch, 1), dtype=np.int64))
        self._frontier.tokens[:, 0] = [row_tokens[-1] for row_tokens in self.node_tokens]
        return self._frontier

    def _counted_mean(self, sorted_children: list[list[float]]) -> list[float]:
        """Batch mean of the newest layer's children by rank of value (``K`` floats), each
        counted as the tree builder's pruning counts it: always ("layer"), or while C3
        would verify it after the chain's earlier nodes ("verified"; else 0). The children
        are worth no more than their parent, so a request's candidates sorted by value are
        its earlier chain nodes, then the children; verifying past the first child verifies
        a tree (earlier layers' siblings are left out)."""
        batch = len(sorted_children)
        means = sorted_children[0] if batch == 1 else [sum(column) / batch for column in zip(*sorted_children)]
        if self.params.expansion_utility == "layer":
            return means
        earlier = len(self.chain_utility) - 2
        utility = self.chain_utility[: earlier + 1]
        for mean in means[: self.max_nodes - earlier]:
            utility.append(utility[-1] + mean)
        cost = self.chain_verify_cost[: earlier + 2] + self.tree_verify_cost[earlier + 2 : len(utility)]
        verified_children = select_max_valid_index(utility, cost, self.params.verify_threshold) - earlier
        return [mean if rank < verified_children else 0.0 for rank, mean in enumerate(means)]

    def _verify_count(self) -> int:
        """C3 on the chain so far: how many of its layers the batch verifies (a request's
        node values do not grow with depth, so its best nodes are its shallowest)."""
        layers = min(len(self.chain_utility) - 1, self.max_nodes)
        return select_max_valid_index(self.chain_utility[: layers + 1], self.chain_verify_cost[: layers + 1],
                                      self.params.verify_threshold)

    def finish(self, root_tokens: list[int], max_nodes_per_request: list[int] | None = None) -> list[DraftChain]:
        """The verified chains, one per request (root first); arguments as the tree builder's."""
        count = self._verify_count()
        caps = [count] * len(self.node_values) if max_nodes_per_request is None else [
            min(count, max(cap, 0)) for cap in max_nodes_per_request]
        counts = [sum(1 for value in values[:cap] if value > 0) for values, cap in zip(self.node_values, caps)]
        trees = DraftChain.batch(root_tokens, self.node_tokens, self.node_values, self.node_probs, self.node_ranks,
                                 counts)
        self.decision.verified.extend(counts)
        self.decision.expected_accepted = sum(sum(values[:n]) for values, n in zip(self.node_values, counts)) / len(counts)
        return trees
