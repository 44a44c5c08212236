"""Algorithm 1 and Theorem 4.1 (EAGLE-2/3's fixed top-K is CAST's special case)."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
import torch
from core_helpers import linear_costs, synthetic_draft

from vllm_cast.config import CastParams
from vllm_cast.oracle import expand_all_layers
from vllm_cast.selection import select_max_valid_index
from vllm_cast.tree import path_to
from vllm_cast.tree_builder import CastTreeBuilder


def test_concave_utility_stops_where_marginal_falls_below_threshold():
    gains = torch.tensor([0.0, 0.9, 0.5, 0.3, 0.1, 0.05])
    utility, cost = gains.cumsum(0), torch.arange(6.0)
    assert select_max_valid_index(utility, cost, threshold=0.25) == 3
    assert select_max_valid_index(utility, cost, threshold=0.0001) == 5
    assert select_max_valid_index(utility, cost, threshold=5.0) == 0


def test_non_concave_step_is_skipped_when_a_later_index_recovers():
    utility = torch.tensor([0.0, 1.0, 1.05, 2.0])  # index 2 adds little, index 3 a lot
    assert select_max_valid_index(utility, torch.arange(4.0), threshold=0.5) == 3


def test_non_monotone_costs_use_their_running_maximum():
    utility = torch.tensor([0.0, 1.0, 1.05, 1.3])
    cost = torch.tensor([0.0, 1.0, 3.0, 2.0])  # a measured dip (noise or tile padding)
    # raw costs would price index 3 at +1 over index 1 and take it; the envelope prices it at +2
    assert select_max_valid_index(utility, cost, threshold=0.2) == 1
    assert select_max_valid_index(utility, cost, threshold=0.1) == 3


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("top_k", [1, 4, 10])
def test_theorem_4_1_breadth_keeps_exactly_k(batch, top_k):
    generator = torch.Generator().manual_seed(batch * 100 + top_k)
    values = torch.rand(batch, 16, generator=generator, dtype=torch.float64).sort(dim=1, descending=True).values
    lam, delta = 0.05, 0.4
    cost = torch.cat([torch.zeros(1, dtype=torch.float64), lam * torch.arange(1, 17, dtype=torch.float64) + delta])
    utility = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(1).mean(0)])
    c1 = float(values[:, top_k - 1].sum()) / (batch * lam)
    assert select_max_valid_index(utility, cost, c1, base=1) == top_k


def eagle2_tree(draft, top_k: int, depth: int, total_tokens: int) -> list[tuple[int, ...]]:
    """Reference EAGLE-2 tree (SafeAILab/EAGLE topK_genrate): root top-K, ``depth`` more
    layers expanding the global top-K frontier, rerank top ``total_tokens - 1`` by value.
    Returns the verified nodes as root paths, in pool order."""
    pool, frontier = [], [((), 1.0)]
    for layer in range(depth + 1):
        candidates = []
        for path, value in frontier:
            probs, tokens = draft(path).topk(top_k)
            candidates += [(path + (int(t),), value * float(p)) for p, t in zip(probs, tokens)]
        pool += candidates
        frontier = sorted(candidates, key=lambda c: -c[1])[:top_k]
    ranked = sorted(range(len(pool)), key=lambda i: -pool[i][1])[: total_tokens - 1]
    return [pool[i][0] for i in sorted(ranked)]


@pytest.mark.parametrize(("top_k", "depth", "total_tokens"), [(4, 3, 20), (3, 2, 9), (5, 4, 40)])
def test_theorem_4_1_reproduces_eagle2_tree(top_k, depth, total_tokens):
    """Linear draft and target costs with the theorem's data-dependent thresholds (C1 per
    layer from v(K), C3 from the m-th value, C2 = 0 with max_depth) give EAGLE-2's tree."""
    draft = synthetic_draft(vocab=12, seed=top_k)
    lam_d, lam_t = 0.02, 0.05
    costs = linear_costs(64, draft_slope=lam_d, draft_base=0.3, target_slope=lam_t)
    params = CastParams(node_top_k=top_k, max_depth=depth + 1, depth_threshold=0.0, breadth_threshold=1.0,
                        expansion_utility="layer")
    builder = CastTreeBuilder(params, costs, max_nodes=total_tokens - 1, ratio_history=deque([1.0], maxlen=4))

    def set_c1(candidate_values: torch.Tensor) -> None:
        v_k = float(candidate_values.sort(descending=True).values[top_k - 1])
        builder.params = dataclasses.replace(builder.params, breadth_threshold=v_k / lam_d)

    set_c1(draft(()).topk(top_k).values)

    def before_expand(child_probs: torch.Tensor) -> None:
        set_c1((torch.from_numpy(builder.frontier_values[0])[:, None] * child_probs[0].topk(top_k).values).flatten())

    expand_all_layers(builder, [draft], before_expand)
    pool = torch.from_numpy(builder.pool_value_array)[0].sort(descending=True).values
    builder.params = dataclasses.replace(builder.params, verify_threshold=float(pool[total_tokens - 2]) / lam_t)
    tree = builder.finish([0])[0]
    ours = [tuple(int(tree.tokens[i]) for i in path_to(tree.parents, node)[1:]) for node in range(1, len(tree))]
    assert builder.decision.widths == [top_k] * (depth + 1)
    assert ours == eagle2_tree(draft, top_k, depth, total_tokens)
