"""CAST's per-step tree construction for a batch: dynamic expansion with breadth and
depth pruning, then dynamic reranking (arXiv 2510.26577, sections 4.1-4.3).

The builder is engine independent: the caller runs the draft model and feeds it the
draft distributions layer by layer; the builder says which nodes to expand next and, at
the end, which nodes the target verifies. Shapes: ``B`` requests, ``V`` vocabulary, ``W``
frontier width, ``K`` = ``node_top_k``.

Node value = product of draft probabilities on the root path (EAGLE-2's confidence), or
of their calibrated acceptance estimates when a ``calibrate`` map is given.
Batch scope (the paper): utilities are averaged over the batch and one width per layer,
one depth and one verify count serve the whole batch; the depth rule reads a layer's
utility as the batch mean or, by default, as the least valued request's
(``CastParams.batch_utility``). Request scope: widths and verify
counts per request (the draft forward still runs at the widest request's width).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_cast.batch_rows import row_numbers
from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.selection import batched_select_max_valid_index, select_max_valid_index
from vllm_cast.tree import FlatTree, with_root


@dataclass
class Frontier:
    """Nodes to expand with the next draft forward (numpy, on the CPU).

    tokens ``[B, W]`` int64; parent_slot ``[B, W]`` int64: index of each node's parent in
    the previous frontier (-1: the root); valid ``[B, W]`` bool (request-scope padding);
    pool_index ``[B, W]`` int64: position in the candidate pool (1-based, 0 = root)."""

    tokens: np.ndarray
    parent_slot: np.ndarray
    valid: np.ndarray
    pool_index: np.ndarray

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class StepDecision:
    """What CAST chose this step (for logs and metrics)."""

    widths: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    expected_accepted: float = 0.0
    draft_forward_tokens: list[int] = field(default_factory=list)
    """Token rows of each draft forward run this step (first pass, then each tree layer)."""
    predicted_first_pass_seconds: float = 0.0
    """Cost table's time for this step's first draft pass."""
    predicted_layer_seconds: float = 0.0
    """Cost table's time for this step's tree layers (one draft pass each)."""
    measured_layer_seconds: float = 0.0
    """Wall time of the layer loop (forwards, top-K, builder steps)."""
    predicted_verify_seconds: float = 0.0
    """Cost table's time for the target forward that verifies the largest tree."""
    priced_draft_seconds: float = 0.0
    """This step's draft passes as CAST priced them: the cost table plus the measured
    overheads (vllm_cast.step_overheads)."""
    priced_verify_seconds: float = 0.0
    """The verifying target forward as CAST priced it (table plus measured overheads)."""
    replayed: bool = False
    """The first pass also replayed rows kept while dormant (a probe: its time is no
    sample of the first-pass overhead)."""
    declined: bool = False
    """The trees were dropped: with measured overheads, plain decoding was faster."""
    chain_step: bool = False
    """Drafted by the chain builder (vllm_cast.chain_builder), not the tree builder."""

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def predicted_draft_seconds(self) -> float:
        """Cost table's time for all of this step's draft passes."""
        return self.predicted_first_pass_seconds + self.predicted_layer_seconds


def _descending(values: np.ndarray) -> np.ndarray:
    """Per-row order that sorts ``values`` ``[B, C]`` descending, ties in index order."""
    return (-values).argsort(axis=1, kind="stable")


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[b, index[b, j]]`` for ``[B, C]`` values and ``[B, J]`` indices (the fast
    spelling of ``np.take_along_axis(values, index, 1)`` for these tiny arrays)."""
    return values[row_numbers(values.shape[0]), index]


def _column_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the rows of ``[B, C]`` values, ``[C]`` (``values.mean(0)`` without its
    per-call overhead, which dominates at these sizes; one row is its own mean)."""
    return values[0] if values.shape[0] == 1 else np.add.reduce(values, 0) / values.shape[0]


def _with_zero_column(values: np.ndarray) -> np.ndarray:
    """``[B, C]`` values with a column of zeros in front, ``[B, C + 1]`` (a curve's index 0)."""
    padded = np.zeros((values.shape[0], values.shape[1] + 1))
    padded[:, 1:] = values
    return padded


def _column_max(values: np.ndarray) -> np.ndarray:
    """Maximum over the rows of ``[B, C]`` values, ``[C]`` (one row is its own maximum)."""
    return values[0] if values.shape[0] == 1 else np.maximum.reduce(values, 0)


def top_children(distributions: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` entries of distributions ``[..., V]``: probabilities (float64) and tokens
    (int64), ``[..., k]`` each."""
    top = distributions.float().topk(k, dim=-1)
    return top.values.numpy().astype(np.float64), top.indices.numpy()


class LayerRules:
    """What CAST's tree and chain builders share: the step's cost curves in plain-step
    units, the depth rule (C2) with its history of layer-to-layer utility ratios, and the
    step's decision so far."""

    def __init__(self, params: CastParams, costs: StepCosts, max_nodes: int, ratio_history: deque | None = None,
                 first_pass_cost: float = 0.0, deep_scales: list[float] | None = None) -> None:
        """``first_pass_cost``: the step's first draft pass in plain-step units (priced into
        the "auto" depth threshold's step cost); ``deep_scales`` ``[B]``: per request, the
        factor (at most 1) its own record puts on the acceptance of its nodes below the
        root's children (``AcceptanceCalibrator.deep_scales``; None: 1 for every request)."""
        self.params = params
        self.deep_scales = deep_scales
        self.k = params.node_top_k
        self.per_request = params.decision_scope == "request"
        self.max_nodes = max_nodes
        self.draft_cost, self.target_cost, self.chain_target_cost = costs.unit_curves
        if self.draft_cost.size <= self.k or self.target_cost.size <= max_nodes + 1:
            raise ValueError("cost curves must cover node_top_k draft tokens and max_nodes + 1 target tokens")
        self.added_verify_cost = costs.added_verify_units
        """Target cost of verifying ``n`` = 1, 2, ... nodes beyond the root, ``[n_max]``, for
        trees (False) and chains (True), without the fixed overhead of verifying at all: C3 weighs
        each node against what it adds, and whether verifying pays at all is the decline
        gate's call, which prices the whole step (vllm_cast.pricing). Charged to the first
        node, that overhead (its median reached 0.53 plain steps) made C3 refuse a first
        node estimated at 0.93, so the "verified" expansion utility counted nothing and the
        trees of a request whose chains were accepted whole stopped at depth 1."""
        self.ratios = ratio_history if ratio_history is not None else deque([1.0], maxlen=params.ratio_buffer_size)
        self.breadth_cost = [0.0, *self.draft_cost[1 : self.k + 1].tolist()]
        """Draft cost of forwarding a layer of ``w`` nodes, ``K + 1`` floats (index 0: none)."""
        self.root_candidates: tuple[np.ndarray, np.ndarray] | None = None
        """Layer-1 candidates: tokens and draft probabilities ``[B, K]`` (by rank)."""
        self.prev_utility = 1.0
        """Utility of the newest layer so far (layer 0: the root, value 1). Counting the
        root makes every step add at least one ratio ``u_1 / u_0`` to the history: with
        ratios only from depth 2 on, a history lowered by hard prompts would stop every
        later step at depth 1 and never be revised."""
        self.expected_tokens = 1.0
        """1 + the kept utility of every layer so far (batch mean expected tokens per step)."""
        self.drafting_cost = first_pass_cost
        """Plain-step units of the draft passes run so far (first pass + forwarded layers)."""
        self.decision = StepDecision()

    def _keeps_drafting(self, width: int, kept_utility: float, next_base: float | None = None) -> bool:
        """Record a layer kept ``width`` nodes wide with batch-mean utility ``kept_utility``
        (expected tokens) and apply depth pruning: whether another layer is drafted (its
        utility predicted as the history's mean ratio times ``next_base``, by default
        ``kept_utility``)."""
        self.decision.widths.append(width)
        if self.prev_utility > 0:
            self.ratios.append(kept_utility / self.prev_utility)
        self.prev_utility = kept_utility
        alpha = sum(self.ratios) / len(self.ratios)
        self.expected_tokens += kept_utility
        if len(self.decision.widths) >= self.params.max_depth:
            return False
        base = kept_utility if next_base is None else next_base
        if self.params.depth_threshold != "auto":
            if alpha * base < float(self.params.depth_threshold) * self.breadth_cost[width]:
                return False
        elif not self._next_layer_raises_rate(alpha * base, width):
            return False
        self.drafting_cost += self.breadth_cost[width]
        return True

    def _next_layer_raises_rate(self, next_utility: float, width: int) -> bool:
        """C2 "auto": whether a next layer worth ``next_utility`` expected tokens raises the
        step's expected tokens per plain-step unit: its marginal rate (``next_utility`` over
        forwarding this layer's ``width`` nodes plus verifying ``width`` more nodes) against
        the step's so far (1 + the kept utility over the draft passes run plus verifying every
        kept node; chain or tree curve). Priced on the draft pass alone, a layer looked
        cheaper than it is wherever verifying a token costs as much as drafting it: on the
        bench pair's cost table one more chain node adds 0.17 plain steps of drafting and
        0.08 (B=1) to 0.38 (B=16) of verifying."""
        widths = self.decision.widths
        nodes = min(sum(widths), self.max_nodes)
        next_nodes = min(nodes + width, self.max_nodes)
        verify = self.chain_target_cost if max(widths) == 1 else self.target_cost
        step_cost = self.drafting_cost + float(verify[1 + nodes])
        layer_cost = self.breadth_cost[width] + float(verify[1 + next_nodes] - verify[1 + nodes])
        return next_utility * step_cost >= self.expected_tokens * layer_cost


class CastTreeBuilder(LayerRules):
    """One speculative step: ``start`` -> ``expand`` ... -> ``finish`` (see module doc).

    The per-step arithmetic runs in numpy on ``[B, K]``-sized arrays (torch's per-op cost
    dominates at these sizes); only the top-K over the vocabulary runs in torch."""

    def __init__(self, params: CastParams, costs: StepCosts, max_nodes: int, ratio_history: deque | None = None,
                 calibrate: Callable[[np.ndarray, bool], np.ndarray] | None = None, first_pass_cost: float = 0.0,
                 deep_scales: list[float] | None = None) -> None:
        """``calibrate``: (draft probabilities ``[..., K]``, whether they lie below the root's
        children) -> acceptance estimates (None: the probabilities themselves); other
        arguments as :class:`LayerRules`'."""
        super().__init__(params, costs, max_nodes, ratio_history, first_pass_cost, deep_scales)
        self.pool_tokens: list[np.ndarray] = []
        self.pool_parents: list[np.ndarray] = []
        self.pool_draft_probs: list[np.ndarray] = []
        self.pool_depths = np.empty(self.k * (1 + max(params.max_depth - 1, 0) * self.k), dtype=np.int64)
        """Tree depth of each pool candidate (1 = child of the root), in pool order: the first
        ``pool_size - 1`` entries of room for every layer's ``K`` children of at most ``K``
        frontier nodes."""
        self.depth_steps = np.arange(1, max_nodes + 1)
        """``[max_nodes]`` 1, 2, ...: the deepest node of the first ``n`` nodes of a chain."""
        self.pool_value_array = np.zeros((0, 0))
        """Values of the pool's candidates ``[B, P]``, in pool order."""
        self.calibrate = calibrate
        self.pool_size = 1  # the root
        self.frontier_values: np.ndarray | None = None
        self.frontier: Frontier | None = None
        self._cut: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def _child_factors(self, probs: np.ndarray) -> np.ndarray:
        """The factor each top-K child ``[..., K]`` multiplies its parent's value by (its
        draft probability, or that probability's calibration); records the raw draft
        probabilities for the pool (the first layer's are the root's children)."""
        deep = bool(self.pool_draft_probs)
        self.pool_draft_probs.append(probs.reshape(probs.shape[0], -1))
        return probs if self.calibrate is None else self.calibrate(probs, deep)

    def _add_candidates(self, tokens: np.ndarray, values: np.ndarray, parents: np.ndarray) -> int:
        """Append candidates ``[B, C]`` to the pool; return the pool index of the first
        (candidate ``j`` of every row gets pool index ``first + j``)."""
        first, count = self.pool_size, tokens.shape[1]
        self.pool_tokens.append(tokens)
        self.pool_value_array = values if first == 1 else np.concatenate([self.pool_value_array, values], 1)
        self.pool_parents.append(parents)
        self.pool_depths[first - 1 : first - 1 + count] = len(self.decision.widths) + 1
        self.pool_size += count
        return first

    def _prune_and_continue(self, tokens: np.ndarray, values: np.ndarray, first_pool_index: int,
                            siblings: int) -> Frontier | None:
        """Breadth-prune one layer's candidates ``[B, C]`` (``siblings`` consecutive
        candidates share a parent, the previous frontier's slot ``column // siblings``; 0:
        children of the root, slot -1); decide on depth; return the frontier to expand or
        None to stop drafting."""
        # Counted values are a prefix of the values sorted descending (see _counted).
        order = _descending(values)
        top_counted = self._counted(_gather(values, order[:, : self.k]))  # every layer has >= K candidates
        cost = self.breadth_cost
        batch_utility = [0.0, *_column_mean(top_counted).cumsum().tolist()]
        if self.per_request:
            widths = batched_select_max_valid_index(_with_zero_column(top_counted.cumsum(axis=1)), cost,
                                                    self.params.breadth_threshold, base=1)
            width = int(widths.max())
        else:
            width = select_max_valid_index(batch_utility, cost, self.params.breadth_threshold, base=1)
            widths = None
        slowest = self.params.batch_utility == "slowest" and not self.per_request
        next_base = None
        if slowest:
            row_utility = top_counted[:, :width].sum(1)
            depth_utility = float(row_utility.min())
            if self.deep_scales is not None:
                next_base = float((row_utility * np.asarray(self.deep_scales)).min())
        else:
            depth_utility = batch_utility[width]
        if not self._keeps_drafting(width, depth_utility, next_base):
            return None
        keep = order[:, :width]
        kept_values = _gather(values, keep)  # values are >= 0: a 0 is padding
        valid = kept_values > 0
        if widths is not None:
            valid &= np.arange(width)[None, :] < widths[:, None]
            kept_values = kept_values * valid
        self.frontier_values = kept_values
        parent_slot = keep // siblings if siblings else np.full_like(keep, -1)
        self.frontier = Frontier(tokens=_gather(tokens, keep), parent_slot=parent_slot, valid=valid,
                                 pool_index=keep + first_pool_index)
        return self.frontier

    def _verify_cost(self, sorted_depths: np.ndarray) -> np.ndarray:
        """Target cost of verifying the first ``n`` = 1, 2, ... nodes of each row,
        ``[B, n_max]``, for pool depths sorted by value ``[B, n_max]``: the causal (chain)
        curve while those nodes form a chain (their deepest node is at depth ``n``), the
        tree curve after."""
        limit = sorted_depths.shape[1]
        is_chain = np.maximum.accumulate(sorted_depths, axis=1) == self.depth_steps[:limit]
        return np.where(is_chain, self.added_verify_cost[True][:limit], self.added_verify_cost[False][:limit])

    def _verify_counts(self, sorted_pool: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Dynamic reranking's verify count per request ``[B]`` for a pool whose values
        are sorted descending ``[B, P]`` (``order``: their pool positions, 0-based), C3
        against the target cost of that many nodes (chain or tree, see ``_verify_cost``)."""
        limit = min(self.max_nodes, sorted_pool.shape[1])
        values = sorted_pool[:, :limit]
        cost = self._verify_cost(self.pool_depths[order[:, :limit]])
        if self.per_request:
            counts = batched_select_max_valid_index(_with_zero_column(values.cumsum(axis=1)), _with_zero_column(cost),
                                                    self.params.verify_threshold)
        else:
            count = select_max_valid_index([0.0, *_column_mean(values).cumsum().tolist()],
                                           [0.0, *_column_max(cost).tolist()], self.params.verify_threshold)
            counts = np.full(values.shape[0], count)
        return np.minimum(counts, (values > 0).sum(1))

    def _verify_cut(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pool's values sorted descending per row ``[B, P]``, their pool positions
        (0-based) and each request's verify count ``[B]``; computed once per pool size (the
        last layer's pruning and ``finish`` see the same pool)."""
        if self._cut is None or self._cut[0] != self.pool_size:
            values = self.pool_value_array
            order = _descending(values)
            sorted_values = _gather(values, order)
            self._cut = (self.pool_size, (sorted_values, order, self._verify_counts(sorted_values, order)))
        return self._cut[1]

    def _counted(self, values: np.ndarray) -> np.ndarray:
        """Values ``[B, C]`` of the newest layer's candidates as breadth/depth pruning
        counts them: all of them ("layer"), or only those inside the verify cut of the pool
        so far ("verified"; the rest count 0). The cut's last value is positive, so the
        counted candidates are those of a row's largest values, ties included."""
        if self.params.expansion_utility == "layer":
            return values
        pool, _, counts = self._verify_cut()
        cut = _gather(pool, np.maximum(counts - 1, 0)[:, None])
        return np.where((values >= cut) & (counts[:, None] > 0), values, 0.0)

    def start(self, root_probs: torch.Tensor) -> Frontier | None:
        """Layer 1 from the draft distribution after the root, ``[B, V]``."""
        return self.start_top(*top_children(root_probs, self.k))

    def start_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        """Layer 1 from the root's top-K draft probabilities (float64) and tokens (int64), ``[B, K]``."""
        values = self._child_factors(probs)
        self.root_candidates = (tokens, self.pool_draft_probs[0])
        first = self._add_candidates(tokens, values, np.zeros_like(tokens))
        return self._prune_and_continue(tokens, values, first, siblings=0)

    def expand(self, child_probs: torch.Tensor) -> Frontier | None:
        """Next layer from the draft distributions at the frontier nodes, ``[B, W, V]``."""
        return self.expand_top(*top_children(child_probs, self.k))

    def expand_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        """Next layer from the frontier nodes' top-K draft probabilities and tokens, ``[B, W, K]``."""
        assert self.frontier is not None and self.frontier_values is not None
        b, w, _ = probs.shape
        values = (self.frontier_values[:, :, None] * self._child_factors(probs)).reshape(b, w * self.k)
        tokens = tokens.reshape(b, w * self.k)
        first = self._add_candidates(tokens, values, np.repeat(self.frontier.pool_index, self.k, axis=1))
        return self._prune_and_continue(tokens, values, first, siblings=self.k)

    def finish(self, root_tokens: list[int], max_nodes_per_request: list[int] | None = None) -> list[FlatTree]:
        """Dynamic reranking: the verified trees, one per request (root first).

        root_tokens ``[B]``: each request's last verified token. max_nodes_per_request
        ``[B]`` optionally caps a request's draft nodes (e.g. near max_model_len)."""
        tokens = np.concatenate(self.pool_tokens, axis=1)
        parents = np.concatenate(self.pool_parents, axis=1)
        draft_probs = np.concatenate(self.pool_draft_probs, axis=1)
        values = self.pool_value_array
        _, order, counts = self._verify_cut()
        if max_nodes_per_request is not None:
            counts = np.minimum(counts, np.maximum(np.asarray(max_nodes_per_request), 0))
        b = counts.size
        widest = int(counts.max())
        rows = np.arange(b)[:, None]
        slot = np.arange(widest)[None, :]
        kept = slot < counts[:, None]
        # Each row's chosen pool positions in pool order (parents before children), padding last.
        candidates = self.pool_size - 1
        chosen = np.sort(np.where(kept, order[:, :widest], candidates), axis=1)
        node_of_pool = np.zeros((b, candidates + 2), dtype=np.int64)  # pool index (0 = root) -> tree node
        node_of_pool[rows, chosen + 1] = np.where(kept, slot + 1, 0)
        chosen = np.minimum(chosen, candidates - 1)  # padding points at any candidate; cut below

        tree_tokens = with_root(np.asarray(root_tokens), tokens[rows, chosen], np.int64)
        tree_parents = with_root(-1, node_of_pool[rows, parents[rows, chosen]], np.int64)
        tree_values = with_root(1.0, values[rows, chosen], np.float32)
        tree_probs = with_root(1.0, draft_probs[rows, chosen], np.float32)
        tree_ranks = with_root(0, chosen % self.k, np.int64)
        trees = [FlatTree(tokens=tree_tokens[row, : m + 1], parents=tree_parents[row, : m + 1],
                          values=tree_values[row, : m + 1], draft_probs=tree_probs[row, : m + 1],
                          ranks=tree_ranks[row, : m + 1])
                 for row, m in enumerate(counts.tolist())]
        self.decision.verified.extend(counts.tolist())
        self.decision.expected_accepted = float((values[rows, chosen] * kept).sum() / b)
        return trees
