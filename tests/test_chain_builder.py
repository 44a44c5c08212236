"""CAST's rules on chains (vllm_cast.chain_builder) against the tree builder's, and the
chain steps of a real engine."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
import torch
from conftest import cast_stats, greedy_token_ids, model_runner
from core_helpers import linear_costs

from vllm_cast.acceptance import AcceptanceCalibrator
from vllm_cast.chain_builder import CastChainBuilder
from vllm_cast.config import CastParams
from vllm_cast.prompts import load_prompts
from vllm_cast.tree import DraftTree
from vllm_cast.tree_builder import CastTreeBuilder

BATCH, TOP_K, LAYERS = 3, 4, 6
PARAMS = CastParams(node_top_k=TOP_K, max_depth=LAYERS)
COSTS = linear_costs(64, draft_slope=0.01, draft_base=0.15, target_slope=0.02)


def _layers(rng: np.random.Generator, second_child: float | None = None, lowest_first: float = 0.9) -> list[np.ndarray]:
    """Per layer, every frontier node's top-K draft probabilities ``[B, K, K]`` (layer 1:
    the root's, ``[B, K]``): a confident first child (``lowest_first``-0.99) and small
    siblings, or on layer 2 two children of ``second_child`` each."""
    layers = []
    for layer in range(LAYERS):
        first = rng.uniform(lowest_first, 0.99, size=(BATCH, TOP_K, 1))
        siblings = np.sort(rng.uniform(0.0, 0.02, size=(BATCH, TOP_K, TOP_K - 1)), axis=2)[:, :, ::-1]
        probs = np.concatenate([first, siblings], axis=2)
        if layer == 1 and second_child is not None:
            probs[:, :, :2] = second_child
        layers.append(probs[:, 0] if layer == 0 else probs)
    return layers


def _draft(builder: CastTreeBuilder | CastChainBuilder, layers: list[np.ndarray]) -> list[DraftTree]:
    """Run a builder over the layers (tokens: 100 * layer + 10 * parent slot + rank)."""
    ranks = np.arange(TOP_K)
    frontier = builder.start_top(layers[0], np.broadcast_to(ranks, (BATCH, TOP_K)).copy())
    layer = 1
    while frontier is not None:
        tokens = 100 * layer + 10 * np.arange(frontier.width)[:, None] + ranks
        frontier = builder.expand_top(layers[layer][:, : frontier.width].copy(),
                                      np.broadcast_to(tokens, (BATCH, frontier.width, TOP_K)).copy())
        layer += 1
    return builder.finish(list(range(BATCH)))


def _calibrator(rng: np.random.Generator) -> AcceptanceCalibrator:
    """A calibrator with recorded outcomes for three requests, at the root's children and
    below (accepted about as often as their draft probabilities say; their own records
    weighed against a prior of 8 expected acceptances, so that these random outcomes leave
    the requests alike)."""
    calibrator = AcceptanceCalibrator(request_prior_strength=8.0)
    for _ in range(20):
        probs = rng.random(40)
        calibrator.record(probs, rng.integers(0, TOP_K, 40), rng.random(40) < probs, np.zeros(40, dtype=bool),
                          rng.integers(0, BATCH, 40), ["a", "b", "c"], deep=rng.random(40) < 0.5)
    return calibrator


def _builders(calibrator: AcceptanceCalibrator, params: CastParams = PARAMS) -> tuple[CastTreeBuilder, CastChainBuilder]:
    greedy, req_ids = np.zeros(BATCH, dtype=bool), ["a", "b", "c"]
    tree = CastTreeBuilder(params, COSTS, 16, deque([1.0], maxlen=4), first_pass_cost=0.3,
                           calibrate=calibrator.estimator(greedy, req_ids))
    chain = CastChainBuilder(params, COSTS, 16, deque([1.0], maxlen=4), first_pass_cost=0.3,
                             calibrate_row=calibrator.row_estimator(greedy, req_ids))
    return tree, chain


@pytest.mark.parametrize("batch_utility", ["mean", "slowest"])
def test_chain_steps_draft_and_verify_the_chains_the_tree_builder_chose(batch_utility):
    rng = np.random.default_rng(0)
    calibrator = _calibrator(rng)
    params = dataclasses.replace(PARAMS, batch_utility=batch_utility)
    depths = set()
    for _ in range(20):
        layers = _layers(rng, lowest_first=0.7)
        tree_builder, chain_builder = _builders(calibrator, params)
        trees, chains = _draft(tree_builder, layers), _draft(chain_builder, layers)
        assert max(tree_builder.decision.widths) == 1 and all(tree.is_chain for tree in trees), "confident: chains"
        assert not chain_builder.wanted_width
        assert chain_builder.decision.widths == tree_builder.decision.widths
        assert chain_builder.decision.verified == tree_builder.decision.verified
        assert abs(chain_builder.decision.expected_accepted - tree_builder.decision.expected_accepted) < 1e-9
        for tree, chain in zip(trees, chains):
            assert tree.tokens.tolist() == chain.tokens and tree.parent_list() == chain.parent_list()
            assert tree.ranks.tolist() == chain.ranks
            assert torch.allclose(tree.values, torch.tensor(chain.values))
            assert torch.allclose(tree.draft_probs, torch.tensor(chain.draft_probs))
        depths.add(tree_builder.decision.depth)
    assert len(depths) > 1, f"every step reached depth {depths}: the depth rule was not exercised"


def test_a_chain_step_flags_a_layer_the_breadth_rule_would_widen():
    rng = np.random.default_rng(1)
    calibrator = _calibrator(rng)
    layers = _layers(rng, second_child=0.48)
    tree_builder, chain_builder = _builders(calibrator)
    _draft(tree_builder, layers)
    chains = _draft(chain_builder, layers)
    assert tree_builder.decision.widths[1] > 1, "two children of 0.48: the tree widens layer 2"
    assert chain_builder.wanted_width
    assert all(chain.is_chain for chain in chains)


def test_solo_requests_decode_as_chain_steps_with_vanilla_output(vanilla_llm, default_cast_llm, monkeypatch):
    """Real engine, greedy, one request at a time on extractive prompts: after a request's
    probes CAST's trees are chains, so most later steps draft through the chain builder.
    Whether speculating pays is measured on the machine (CI's 2 cores once judged every
    request's probes slower, and no tree was drafted): the test pretends it pays."""
    drafter = model_runner(default_cast_llm).drafter
    monkeypatch.setattr(drafter.solo, "slower", lambda *args: False)
    monkeypatch.setattr(drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    prompts = load_prompts("qa", limit=3)
    before = cast_stats(default_cast_llm)
    for prompt in prompts:
        assert greedy_token_ids(default_cast_llm, [prompt], 64) == greedy_token_ids(vanilla_llm, [prompt], 64)
    after = cast_stats(default_cast_llm)
    chain_steps, steps = after["chain_steps"] - before["chain_steps"], after["steps"] - before["steps"]
    assert chain_steps > 0, f"no chain step in {steps} drafting steps"


def _two_request_layers(second_row_top: float) -> list[np.ndarray]:
    """Layers for a batch of ``BATCH`` requests where every node's best child has draft
    probability 0.95, except on the last row: ``second_row_top`` (siblings 0.01)."""
    layers = []
    for layer in range(LAYERS):
        probs = np.full((BATCH, TOP_K, TOP_K), 0.01)
        probs[:, :, 0] = 0.95
        probs[-1, :, 0] = second_row_top
        layers.append(probs[:, 0].copy() if layer == 0 else probs)
    return layers


def test_the_slowest_request_sets_the_depth_of_a_batch_tree():
    """``batch_utility="slowest"``: a layer is worth to the batch what it is worth to the
    request it helps least (they verify together); "mean" drafts deeper for the confident
    rows. Both builders read it alike; with every row alike the two agree."""
    depths = {}
    for batch_utility in ("mean", "slowest"):
        params = dataclasses.replace(PARAMS, batch_utility=batch_utility, acceptance_calibration=False)
        for builder_type in (CastTreeBuilder, CastChainBuilder):
            for top in (0.95, 0.6):
                builder = builder_type(params, COSTS, 16, deque([1.0], maxlen=4), first_pass_cost=0.3)
                _draft(builder, _two_request_layers(top))
                depths[batch_utility, builder_type.__name__, top] = builder.decision.depth
    for name in ("CastTreeBuilder", "CastChainBuilder"):
        assert depths["mean", name, 0.95] == depths["slowest", name, 0.95] == LAYERS, depths
        assert depths["slowest", name, 0.6] < depths["mean", name, 0.6], depths
        assert depths["slowest", name, 0.6] == depths["slowest", "CastTreeBuilder", 0.6], depths


def test_a_request_read_wrong_below_the_first_layer_keeps_the_batch_shallow():
    """Depth rule with ``deep_scales``: every row's children look confident (0.95), but one
    request's own record says its nodes below the root's children are rarely accepted, so
    the slowest request's next layer is predicted at that scale and both builders stop
    sooner than with no record; with the scale at 1 they draft as before."""
    depths = {}
    params = dataclasses.replace(PARAMS, acceptance_calibration=False)
    for builder_type in (CastTreeBuilder, CastChainBuilder):
        for scales in (None, [1.0] * BATCH, [1.0] * (BATCH - 1) + [0.1]):
            builder = builder_type(params, COSTS, 16, deque([1.0], maxlen=4), first_pass_cost=0.3, deep_scales=scales)
            _draft(builder, _two_request_layers(0.95))
            depths[builder_type.__name__, None if scales is None else scales[-1]] = builder.decision.depth
    for name in ("CastTreeBuilder", "CastChainBuilder"):
        assert depths[name, None] == depths[name, 1.0] == LAYERS, depths
        assert depths[name, 0.1] == 1, depths
