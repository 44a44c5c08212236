"""CAST's chosen tree against the exhaustively best tree on small cases."""

from __future__ import annotations

import pytest
from core_helpers import linear_costs, synthetic_draft

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.oracle import best_tree, cast_tree


def memory_bound_costs(max_tokens: int) -> StepCosts:
    """Batch-1 GPU-like: verify cost nearly flat in tokens, draft ~8% of a target step."""
    return linear_costs(max_tokens, draft_slope=0.002, draft_base=0.08, target_slope=0.004)


def compute_bound_costs(max_tokens: int) -> StepCosts:
    """Large-batch-like: every verified token costs 20% of a decode step."""
    return linear_costs(max_tokens, draft_slope=0.03, draft_base=0.1, target_slope=0.2, target_base=0.8)


@pytest.mark.parametrize(("costs_fn", "floor"), [(memory_bound_costs, 0.95), (compute_bound_costs, 0.85)])
def test_cast_is_close_to_the_best_tree(costs_fn, floor):
    """Where verifying is expensive the best is often plain decoding, which an EAGLE
    drafter cannot choose before its first (KV-syncing) draft pass; hence the lower floor."""
    costs = costs_fn(64)
    params = CastParams(node_top_k=3, max_depth=3, breadth_threshold=1.0, depth_threshold=1.0, verify_threshold=1.0)
    ratios = []
    for seed in range(6):
        draft = synthetic_draft(vocab=8, concentration=0.25, seed=seed)
        best = best_tree(draft, costs, top_k=3, max_layers=3, max_nodes=24)
        ours = cast_tree(draft, costs, params, max_nodes=24)
        ratios.append(ours.tokens_per_second / best.tokens_per_second)
    mean = sum(ratios) / len(ratios)
    print(f"\n{costs_fn.__name__}: CAST / best expected tokens per second = {mean:.3f} (min {min(ratios):.3f})")
    assert all(r <= 1.0 + 1e-6 for r in ratios), "the exhaustive search missed a better tree"
    assert mean >= floor and min(ratios) >= 0.75


def test_expensive_verification_shrinks_the_tree():
    draft = synthetic_draft(vocab=8, concentration=0.25, seed=1)
    params = CastParams(node_top_k=3, max_depth=3, breadth_threshold=1.0, depth_threshold=1.0, verify_threshold=1.0)
    cheap = cast_tree(draft, memory_bound_costs(64), params, max_nodes=24)
    dear = cast_tree(draft, compute_bound_costs(64), params, max_nodes=24)
    assert dear.verified < cheap.verified
