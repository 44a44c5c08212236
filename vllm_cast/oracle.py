"""Exhaustive best-tree search on small cases, to judge CAST's choices.

The model of a step (the paper's, Fig. 3): expected emitted tokens = 1 + sum of the values
of the verified nodes; step time = the root draft forward + one draft forward per
expanded layer (width w costs ``draft[w]``) + the target forward over 1 + m tokens.
A tree's score is expected tokens per second. The draft is a function from a root path
(tuple of tokens) to the next-token distribution ``[V]``; batch size 1.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.tree_builder import CastTreeBuilder

DraftFn = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass
class ScoredTree:
    widths: tuple[int, ...]
    verified: int
    expected_tokens: float
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.seconds


def candidate_pool(draft: DraftFn, top_k: int, widths: tuple[int, ...]) -> list[float]:
    """Values of every candidate created when expanding layers with ``widths`` (EAGLE
    expansion: each layer's top-``w`` candidates by value are expanded by top-``k``)."""
    frontier = [((), 1.0)]
    pool: list[float] = []
    for layer in range(len(widths) + 1):
        candidates = []
        for path, value in frontier:
            probs, tokens = draft(path).topk(top_k)
            candidates += [(path + (int(t),), value * float(p)) for p, t in zip(probs, tokens)]
        pool += [v for _, v in candidates]
        if layer == len(widths):
            break
        candidates.sort(key=lambda item: -item[1])
        frontier = candidates[: widths[layer]]
    return pool


def score(pool: list[float], widths: tuple[int, ...], verified: int, costs: StepCosts) -> ScoredTree:
    values = sorted(pool, reverse=True)[:verified]
    seconds = float(costs.draft[1] + sum(costs.draft[w] for w in widths) + costs.target[1 + verified])
    return ScoredTree(widths, verified, 1.0 + sum(values), seconds)


def best_tree(draft: DraftFn, costs: StepCosts, top_k: int, max_layers: int, max_nodes: int) -> ScoredTree:
    """The best (widths, verified count) over all expansions of up to ``max_layers``
    candidate layers; plain decoding (no drafting) is included as widths=() verified=0
    without the draft cost."""
    best = ScoredTree((), 0, 1.0, float(costs.target[1]))
    for layers in range(1, max_layers + 1):
        for widths in itertools.product(range(1, top_k + 1), repeat=layers - 1):
            pool = candidate_pool(draft, top_k, widths)
            for m in range(min(max_nodes, len(pool)) + 1):
                tree = score(pool, widths, m, costs)
                if tree.tokens_per_second > best.tokens_per_second:
                    best = tree
    return best


def expand_all_layers(builder: CastTreeBuilder, drafts: list[DraftFn],
                      before_expand: Callable[[torch.Tensor], None] | None = None) -> None:
    """Draft every layer ``builder`` asks for, for ``len(drafts)`` requests whose draft
    models are path -> distribution functions; ``before_expand(child_probs [B, W, V])``
    is called before each expansion. The caller then runs ``builder.finish``."""
    paths: list[list[tuple[int, ...]]] = [[()] for _ in drafts]
    frontier = builder.start(torch.stack([draft(()) for draft in drafts]))
    while frontier is not None:
        for row, draft in enumerate(drafts):
            paths[row] = [(paths[row][s] if s >= 0 else ()) + (t,) for t, s in
                          zip(frontier.tokens[row].tolist(), frontier.parent_slot[row].tolist())]
        child_probs = torch.stack([torch.stack([draft(p) for p in paths[row]]) for row, draft in enumerate(drafts)])
        if before_expand is not None:
            before_expand(child_probs)
        frontier = builder.expand(child_probs)


def cast_tree(draft: DraftFn, costs: StepCosts, params: CastParams, max_nodes: int) -> ScoredTree:
    """Run :class:`CastTreeBuilder` on ``draft`` and score the tree it verifies."""
    builder = CastTreeBuilder(params, costs, max_nodes, deque([1.0], maxlen=params.ratio_buffer_size))
    expand_all_layers(builder, [draft])
    tree = builder.finish([0])[0]
    expanded = tuple(builder.decision.widths[:-1])  # the last pruned layer is not expanded
    return score(candidate_pool(draft, params.node_top_k, expanded), expanded, len(tree) - 1, costs)
