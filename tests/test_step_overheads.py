"""Measured step overheads (vllm_cast.step_overheads) and chain-priced verification."""

from __future__ import annotations

import torch

from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.step_overheads import (MIN_SAMPLES, PLAIN_SAMPLES_LAST, REFRESH_SAMPLES, RESOLUTION_SECONDS,
                                      VERIFY_SAMPLES_LAST, WINDOW, RecentMedians, StepOverheads, batch_bucket)
from vllm_cast.tree_builder import CastTreeBuilder


def _costs(chain_slope: float, tree_slope: float = 0.3) -> StepCosts:
    n = torch.arange(18, dtype=torch.float64)
    positive = (n > 0).double()
    return StepCosts(draft=0.2 * positive, target=(1.0 + tree_slope * (n - 1)) * positive,
                     chain_target=(1.0 + chain_slope * (n - 1)) * positive)


def test_buckets_are_powers_of_two():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_a_full_window_s_median_is_refreshed_every_few_samples():
    medians = RecentMedians()
    for sample in range(WINDOW - 1):
        medians.add("b", float(sample))
        assert medians.median("b", min_samples=1) == (sample / 2), "a filling window is recomputed on every sample"
    medians.add("b", WINDOW - 1.0)
    full = medians.median("b")
    for _ in range(REFRESH_SAMPLES - 1):
        medians.add("b", 1e3)
        assert medians.median("b") == full, "held between refreshes"
    medians.add("b", 1e3)
    assert medians.median("b") > full


def test_overheads_apply_after_enough_samples_as_a_robust_median():
    overheads = StepOverheads()
    costs = _costs(0.05)
    for sample in range(MIN_SAMPLES - 1):
        overheads.record_step(4, measured=1.5, predicted=1.0, verified_drafts=False)
        overheads.record_drafting(4, measured=2.0, predicted_first_pass=0.4, measured_layers=1.2,
                                  predicted_layers=0.6, layers=2)
    assert overheads.adjust(4, costs) is costs, "too few samples: no overhead yet"
    overheads.record_step(4, measured=1.5, predicted=1.0, verified_drafts=False)
    overheads.record_step(4, measured=50.0, predicted=1.0, verified_drafts=False)  # one stalled step
    for _ in range(2):
        overheads.record_drafting(4, measured=2.0, predicted_first_pass=0.4, measured_layers=1.2,
                                  predicted_layers=0.6, layers=2)
    adjusted = overheads.adjust(4, costs)
    assert torch.allclose(adjusted.target[1:], costs.target[1:] + 0.5)
    assert torch.allclose(adjusted.chain_target[1:], costs.chain_target[1:] + 0.5)
    assert adjusted.target[0] == 0 and adjusted.draft[0] == 0
    assert abs(float(adjusted.draft[1] - costs.draft[1]) - 0.3) < 1e-9, "per layer: (1.2 - 0.6) / 2"
    first_pass = float(adjusted.causal_draft_curve()[1] - costs.causal_draft_curve()[1])
    assert abs(first_pass - 0.4) < 1e-9, "first pass: 2.0 - 1.2 (the layers) - 0.4 (predicted)"
    assert overheads.adjust(1, costs) is costs, "smaller batch sizes are not affected"
    unmeasured = overheads.adjust(16, costs)
    assert torch.allclose(unmeasured.target, adjusted.target), "larger ones take it until they have their own"
    for _ in range(MIN_SAMPLES):
        overheads.record_step(16, measured=1.2, predicted=1.0, verified_drafts=False)
    own = overheads.adjust(16, costs)
    assert torch.allclose(own.target[1:], costs.target[1:] + 0.2), "once measured, a bucket's own median"
    assert torch.allclose(own.draft, adjusted.draft), "kinds it has not measured are still taken from below"


def test_verifying_steps_price_their_own_overhead_from_the_plain_step_on():
    """Steps that verified drafts pay more outside the forwards than plain steps (tree
    acceptance, speculative input preparation): the plain step (index 1) keeps the plain
    overhead and every verification gets the verifying steps' own, once measured."""
    overheads = StepOverheads()
    costs = _costs(0.05)
    for _ in range(MIN_SAMPLES):
        overheads.record_step(1, measured=1.5, predicted=1.0, verified_drafts=False)
    until_measured = overheads.adjust(1, costs)
    assert torch.allclose(until_measured.target[1:], costs.target[1:] + 0.5), "verify overhead defaults to plain"
    assert until_measured.verification_overhead == 0.0
    for _ in range(MIN_SAMPLES):
        overheads.record_step(1, measured=3.0, predicted=1.2, verified_drafts=True)
    adjusted = overheads.adjust(1, costs)
    assert abs(float(adjusted.target[1] - costs.target[1]) - 0.5) < 1e-9
    assert torch.allclose(adjusted.target[2:], costs.target[2:] + 1.8)
    assert torch.allclose(adjusted.chain_target[2:], costs.chain_target[2:] + 1.8)
    assert abs(adjusted.verification_overhead - 1.3) < 1e-9, "the fixed cost of verifying at all, beyond plain's"


def test_adjusted_costs_are_reused_until_an_overhead_moves_by_the_resolution():
    overheads = StepOverheads()
    costs = _costs(0.05)
    for _ in range(MIN_SAMPLES):
        overheads.record_step(1, measured=1.5, predicted=1.0, verified_drafts=False)
    adjusted = overheads.adjust(1, costs)
    overheads.record_step(1, measured=1.5 + RESOLUTION_SECONDS / 10, predicted=1.0, verified_drafts=False)
    assert overheads.adjust(1, costs) is adjusted, "a sub-resolution move rebuilt the curves"
    for _ in range(MIN_SAMPLES + 2):  # most of the window, so the median is the new value
        overheads.record_step(1, measured=1.5 + 3 * RESOLUTION_SECONDS, predicted=1.0,
                              verified_drafts=False)
    moved = overheads.adjust(1, costs)
    assert torch.allclose(moved.target[1:], costs.target[1:] + 0.5 + 3 * RESOLUTION_SECONDS, rtol=0, atol=1e-9)
    assert overheads.adjust(1, _costs(0.1)) is not moved, "other table costs share the memo"


def _verified(chain_slope: float) -> tuple[int, bool]:
    params = CastParams(breadth_threshold=1.0, depth_threshold=0.0, verify_threshold=1.0, node_top_k=2, max_depth=4)
    builder = CastTreeBuilder(params, _costs(chain_slope), max_nodes=16)
    probs = torch.zeros(1, 8)
    probs[0, :2] = torch.tensor([0.7, 0.1])
    frontier = builder.start(probs)
    while frontier is not None:
        frontier = builder.expand(probs.expand(frontier.width, -1)[None])
    trees = builder.finish([0])
    return len(trees[0]) - 1, trees[0].is_chain


def test_a_chain_priced_cheaper_than_a_tree_is_verified_deeper():
    tree_priced, _ = _verified(chain_slope=0.3)
    chain_priced, is_chain = _verified(chain_slope=0.05)
    assert is_chain and chain_priced > tree_priced


def test_plain_samples_go_stale_by_age_and_not_by_verifications(monkeypatch):
    """A bucket's plain samples are stale once its newest is older than ``PLAIN_SAMPLES_LAST``
    (or it has none of its own): verifications do not refresh them, a new plain step does,
    and dropped samples leave the bucket stale and unpriced."""
    now = [100.0]
    monkeypatch.setattr("vllm_cast.step_overheads.time.monotonic", lambda: now[0])
    overheads = StepOverheads()
    assert overheads.plain_is_stale(4)
    for _ in range(MIN_SAMPLES):
        overheads.record_step(4, measured=3e-3, predicted=2e-3, verified_drafts=False)
    assert not overheads.plain_is_stale(4) and not overheads.plain_is_stale(3), "3 and 4 share a bucket"
    assert overheads.plain_is_stale(8) and overheads.plain_is_stale(2)
    now[0] += PLAIN_SAMPLES_LAST + 0.1
    overheads.record_step(4, measured=9e-3, predicted=4e-3, verified_drafts=True)
    assert overheads.plain_is_stale(4)
    overheads.record_step(4, measured=3e-3, predicted=2e-3, verified_drafts=False)
    assert not overheads.plain_is_stale(4)
    overheads.forget_plain(4)
    assert overheads.plain_is_stale(4) and overheads.plain.median(batch_bucket(4), min_samples=1) is None


def test_old_verification_samples_stop_pricing_verifications(monkeypatch):
    """Verifications are priced with their bucket's samples only while its newest is younger
    than ``VERIFY_SAMPLES_LAST`` (a gate that declines on them verifies nothing that would
    replace them): then the bucket is priced as if never verified (here: the plain
    overhead), until new verifications are measured."""
    now = [100.0]
    monkeypatch.setattr("vllm_cast.step_overheads.time.monotonic", lambda: now[0])
    overheads = StepOverheads()
    costs = _costs(0.05)
    for _ in range(MIN_SAMPLES):
        overheads.record_step(4, measured=1.5, predicted=1.0, verified_drafts=False)
        overheads.record_step(4, measured=8.0, predicted=1.2, verified_drafts=True)
    assert overheads.verifications_measured(4)
    assert torch.allclose(overheads.adjust(4, costs).target[2:], costs.target[2:] + 6.8)
    now[0] += VERIFY_SAMPLES_LAST + 0.1
    overheads.record_step(4, measured=1.5, predicted=1.0, verified_drafts=False)
    assert not overheads.verifications_measured(4), "plain steps do not keep verifications fresh"
    assert torch.allclose(overheads.adjust(4, costs).target[2:], costs.target[2:] + 0.5)
    for _ in range(MIN_SAMPLES):
        overheads.record_step(4, measured=2.0, predicted=1.2, verified_drafts=True)
    assert overheads.verifications_measured(4)
    assert torch.allclose(overheads.adjust(4, costs).target[2:], costs.target[2:] + 0.8), "only the new samples"
