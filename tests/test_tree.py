"""Tree representation invariants (property tests) and CAST builder output validity."""

from __future__ import annotations

from collections import deque

import torch
from core_helpers import linear_costs, synthetic_draft
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.oracle import expand_all_layers
from vllm_cast.tree import (
    FlatTree,
    ancestor_mask,
    batched_ancestor_mask,
    check_topological,
    depths,
    path_to,
    root_to_leaf_paths,
)
from vllm_cast.tree_builder import CastTreeBuilder


@st.composite
def topological_parents(draw, max_nodes: int = 40):
    n = draw(st.integers(1, max_nodes))
    return torch.tensor([-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)], dtype=torch.int64)


@settings(max_examples=150, deadline=None)
@given(topological_parents())
def test_ancestor_mask_rows_are_root_paths(parents):
    check_topological(parents)
    mask = ancestor_mask(parents)
    depth = depths(parents)
    for node in range(parents.numel()):
        assert mask[node].nonzero().flatten().tolist() == sorted(path_to(parents, node))
        assert int(mask[node].sum()) == int(depth[node]) + 1


@settings(max_examples=150, deadline=None)
@given(topological_parents(), st.integers(0, 40))
def test_every_prefix_is_a_tree_with_the_same_masks(parents, cut):
    length = max(1, min(cut, parents.numel()))
    prefix = parents[:length]
    check_topological(prefix)
    assert torch.equal(ancestor_mask(prefix), ancestor_mask(parents)[:length, :length])


@settings(max_examples=100, deadline=None)
@given(topological_parents())
def test_root_to_leaf_paths_cover_every_node_once_as_a_leaf(parents):
    paths = root_to_leaf_paths(parents)
    assert (paths[:, 0] == 0).all()
    covered = set(paths[paths >= 0].tolist())
    assert covered == set(range(parents.numel()))
    leaves = [row[row >= 0][-1].item() for row in paths]
    assert len(set(leaves)) == len(leaves)


@settings(max_examples=60, deadline=None)
@given(st.lists(topological_parents(24), min_size=1, max_size=5))
def test_batched_masks_equal_per_tree_masks(trees):
    n = max(t.numel() for t in trees)
    padded = torch.full((len(trees), n), -1, dtype=torch.int64)
    for row, t in enumerate(trees):
        padded[row, : t.numel()] = t
    lengths = torch.tensor([t.numel() for t in trees])
    batched = batched_ancestor_mask(padded, lengths)
    for row, t in enumerate(trees):
        k = t.numel()
        assert torch.equal(batched[row, :k, :k], ancestor_mask(t))
        assert not batched[row, k:].any() and not batched[row, :, k:].any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 6), st.integers(1, 48), st.sampled_from(["batch", "request"]),
       st.floats(0.2, 20), st.floats(0.0, 5), st.floats(0.2, 20))
def test_builder_trees_are_valid_and_within_budget(batch, top_k, max_depth, max_nodes, scope, c1, c2, c3):
    params = CastParams(node_top_k=top_k, max_depth=max_depth, breadth_threshold=c1, depth_threshold=c2,
                        verify_threshold=c3, decision_scope=scope)
    costs = linear_costs(64, draft_slope=0.01, draft_base=0.2, target_slope=0.03)
    drafts = [synthetic_draft(vocab=16, seed=b) for b in range(batch)]
    builder = CastTreeBuilder(params, costs, max_nodes, deque([1.0], maxlen=params.ratio_buffer_size))
    expand_all_layers(builder, drafts)
    trees = builder.finish(list(range(batch)))
    assert 1 <= builder.decision.depth <= max_depth
    assert all(1 <= w <= top_k for w in builder.decision.widths)
    for b, tree in enumerate(trees):
        check_topological(tree.parents)
        assert isinstance(tree, FlatTree) and len(tree) - 1 <= max_nodes
        assert int(tree.tokens[0]) == b
        parent_values = tree.values[tree.parents[1:]]
        assert (tree.values[1:] <= parent_values).all(), "a child is worth more than its parent"
        for node in range(1, len(tree)):  # each node's value is its path's draft probability product
            path = [int(tree.tokens[i]) for i in path_to(tree.parents, node)[1:]]
            expected = 1.0
            for depth in range(len(path)):
                expected *= float(drafts[b](tuple(path[:depth]))[path[depth]])
            assert abs(float(tree.values[node]) - expected) < 1e-5


def _linear_step_costs(draft_cost: float, verification_overhead: float = 0.0,
                       counted_as_fixed: bool = False, chain_node_cost: float = 0.02) -> StepCosts:
    """Draft layers at ``draft_cost`` plain steps, verification +0.05 (tree) /
    +``chain_node_cost`` (chain) per node, and ``verification_overhead`` on every
    verification, declared as the fixed overhead it is (``counted_as_fixed``) or left inside
    the curve."""
    n = torch.arange(18, dtype=torch.float64)
    positive = (n > 0).double()
    verifying = (n > 1).double() * verification_overhead
    return StepCosts(draft=draft_cost * positive, target=(1.0 + 0.05 * (n - 1) + verifying) * positive,
                     chain_target=(1.0 + chain_node_cost * (n - 1) + verifying) * positive,
                     verification_overhead=verification_overhead if counted_as_fixed else 0.0)


def _confident_depth(params: CastParams, costs: StepCosts, top_prob: float) -> int:
    """Depth a single-request tree reaches when every node's top child has draft probability
    ``top_prob`` (the second 0.02, the rest 0) and the first pass costs 0.3 plain steps."""
    builder = CastTreeBuilder(params, costs, max_nodes=16, first_pass_cost=0.3)
    probs = torch.zeros(1, 8)
    probs[0, :2] = torch.tensor([top_prob, 0.02])
    frontier = builder.start(probs)
    while frontier is not None:
        frontier = builder.expand(probs.expand(frontier.width, -1)[None])
    return builder.decision.depth


def test_auto_depth_drafts_deeper_when_layers_are_cheaper():
    params = CastParams(node_top_k=2, max_depth=8, depth_threshold="auto", acceptance_calibration=False)
    cheap = _confident_depth(params, _linear_step_costs(draft_cost=0.05), top_prob=0.9)
    dear = _confident_depth(params, _linear_step_costs(draft_cost=0.6), top_prob=0.9)
    assert cheap == 8, "cheap layers: up to max_depth"
    assert 1 <= dear < cheap


def test_auto_depth_prices_verifying_the_next_layer():
    """A layer is worth drafting only if its expected tokens repay its draft pass and the
    verification of its node: with the draft pass alone priced, chains whose nodes cost as
    much to verify as to draft (the bench pair at B=4: 0.17 and 0.11 plain steps) ran 3-deep
    where 1-deep chains were faster."""
    params = CastParams(node_top_k=2, max_depth=8, verify_threshold=0.5, acceptance_calibration=False)  # C3 verifies all
    cheap = _confident_depth(params, _linear_step_costs(draft_cost=0.15, chain_node_cost=0.0), top_prob=0.8)
    dear = _confident_depth(params, _linear_step_costs(draft_cost=0.15, chain_node_cost=0.3), top_prob=0.8)
    assert 1 <= dear < cheap


def test_the_fixed_cost_of_verifying_does_not_stop_a_confident_chain_at_depth_one():
    """C3 weighs each node against what verifying it adds; the overhead every verification
    pays is the decline gate's to judge. Charged to the first node (0.53 plain steps against
    its 0.93 estimate: below C3 = 2.5) it left the "verified" expansion utility empty."""
    params = CastParams(node_top_k=2, max_depth=6, acceptance_calibration=False)

    def depth(overhead: float, counted_as_fixed: bool) -> int:
        return _confident_depth(params, _linear_step_costs(0.25, overhead, counted_as_fixed), top_prob=0.93)

    assert depth(0.53, counted_as_fixed=False) == 1, "the overhead charged to the first node"
    assert depth(0.53, counted_as_fixed=True) == 6
    assert depth(0.0, counted_as_fixed=True) == 6


def test_depth_rule_recovers_after_a_run_of_poor_layer_ratios():
    """A ratio history lowered by hard prompts must not pin every later step at depth 1:
    each step adds the first layer's ratio to the root (u_1 / u_0, u_0 = 1), so confident
    drafts raise alpha again within R steps."""
    n = torch.arange(18, dtype=torch.float64)
    positive = (n > 0).double()
    costs = StepCosts(draft=0.2 * positive, target=(1.0 + 0.05 * (n - 1)) * positive,
                      chain_target=(1.0 + 0.02 * (n - 1)) * positive)
    params = CastParams(node_top_k=2, max_depth=6, acceptance_calibration=False)
    history = deque([0.05] * params.ratio_buffer_size, maxlen=params.ratio_buffer_size)
    probs = torch.zeros(1, 8)
    probs[0, :2] = torch.tensor([0.95, 0.03])
    step_depths = []
    for _ in range(2 * params.ratio_buffer_size):
        builder = CastTreeBuilder(params, costs, max_nodes=16, ratio_history=history)
        frontier = builder.start(probs)
        while frontier is not None:
            frontier = builder.expand(probs.expand(frontier.width, -1)[None])
        step_depths.append(builder.decision.depth)
    assert step_depths[0] == 1, "alpha = 0.05 stops the first step at depth 1"
    assert step_depths[-1] == params.max_depth, f"alpha never recovered: depths {step_depths}"
