"""Online acceptance calibration (vllm_cast.acceptance), per verification mode."""

from __future__ import annotations

import numpy as np
import torch

from vllm_cast.acceptance import MIN_RATE_REQUESTS, AcceptanceCalibrator


def test_greedy_and_sampled_acceptance_are_learned_apart():
    calibrator = AcceptanceCalibrator()
    generator = torch.Generator().manual_seed(0)
    n = 400
    probs = torch.full((n,), 0.07)
    for sampled, rate in ((False, 0.8), (True, 0.2)):
        outcomes = torch.rand(n, generator=generator) < rate
        calibrator.record(probs, torch.zeros(n, dtype=torch.int64), outcomes, torch.full((n,), sampled))
    estimates = calibrator(torch.tensor([[0.07, 0.01], [0.07, 0.01]]), sampled=torch.tensor([False, True]))
    assert abs(float(estimates[0, 0]) - 0.8) < 0.06 and abs(float(estimates[1, 0]) - 0.2) < 0.06
    assert abs(float(estimates[0, 1]) - 0.01) < 1e-6, "unseen cells keep the raw draft probability"


def test_the_first_rank_rate_averages_finished_requests_each_counted_once():
    """The rate that hopeless verdicts rest on is the mean of MIN_RATE_REQUESTS or more
    finished requests' own first-rank rates: a long request does not outweigh short ones,
    and requests still running do not count."""
    calibrator = AcceptanceCalibrator()

    def decode(request: str, outcomes: int, accepted: bool) -> None:
        calibrator.record([0.5] * outcomes, [0] * outcomes, [accepted] * outcomes, [False] * outcomes,
                          owners=[0] * outcomes, owner_ids=[request])

    decode("long", 512, accepted=False)
    calibrator.retain([])
    for request in range(1, MIN_RATE_REQUESTS):
        decode(f"r{request}", 2, accepted=True)
    assert calibrator.first_rank_rate(False) is None, "the short requests are still running"
    calibrator.retain([])
    rate = calibrator.first_rank_rate(False)
    assert rate is not None and abs(rate - (MIN_RATE_REQUESTS - 1) / MIN_RATE_REQUESTS) < 1e-9, rate
    assert calibrator.first_rank_rate(False, best=True) == 1.0, "the best of them: every outcome accepted"
    assert calibrator.first_rank_rate(True) is None


def test_each_request_is_scaled_by_its_own_first_rank_record():
    """Two requests with the same flat draft probabilities: the one whose first-rank
    children are always accepted gets a higher first-rank estimate than the shared table's,
    the one whose are never accepted a lower one; siblings keep the shared estimate, and a
    request's record is dropped once it leaves the batch."""
    calibrator = AcceptanceCalibrator()
    generator = torch.Generator().manual_seed(0)
    n = 200
    calibrator.record(torch.full((n,), 0.03), torch.zeros(n, dtype=torch.int64), torch.rand(n, generator=generator) < 0.5,
                      torch.zeros(n, dtype=torch.bool))
    steps = 24
    owners = torch.tensor([0, 1] * steps)
    calibrator.record(torch.full((2 * steps,), 0.03), torch.zeros(2 * steps, dtype=torch.int64), owners == 0,
                      torch.zeros(2 * steps, dtype=torch.bool), owners.numpy(), owner_ids=["easy", "hard"])
    probs = np.array([[0.03, 0.02], [0.03, 0.02], [0.03, 0.02]])
    shared = calibrator.estimator(np.zeros(3, dtype=bool))(probs)
    scaled = calibrator.estimator(np.zeros(3, dtype=bool), ["easy", "hard", "new"])(probs)
    assert scaled[0, 0] > shared[0, 0] + 0.2 and scaled[1, 0] < shared[1, 0] - 0.2
    assert scaled[0, 0] <= 1.0
    assert scaled[2, 0] == shared[2, 0], "a request without a record takes the shared estimate"
    assert np.array_equal(scaled[:, 1], shared[:, 1]), "siblings are not scaled"
    layer = calibrator.estimator(np.zeros(2, dtype=bool), ["easy", "hard"])(np.tile(probs[:2, None, :], (1, 3, 1)))
    assert np.allclose(layer[:, :, 0], scaled[:2, None, 0]), "every parent's first child is scaled alike"
    calibrator.retain(["hard"])
    assert calibrator.estimator(np.zeros(1, dtype=bool), ["easy"])(probs[:1])[0, 0] == shared[0, 0]


def test_a_request_keeps_separate_records_for_the_first_layer_and_below():
    """A request whose first draft token is accepted on every step and whose second never
    is (and one the other way round): its own first-layer estimate rises above the shared
    table's and its deeper estimate falls below it; ``deep_scales`` reports the deeper
    factor, capped at 1."""
    calibrator = AcceptanceCalibrator()
    steps = 24
    owners = [0, 0, 1, 1] * steps
    deep = [False, True, False, True] * steps
    accepted = [True, False, False, True] * steps
    calibrator.record([0.5] * len(owners), [0] * len(owners), accepted, [False] * len(owners), owners,
                      owner_ids=["first_only", "deep_only"], deep=deep)
    probs = np.array([[0.5, 0.1], [0.5, 0.1]])
    shared = calibrator.estimator(np.zeros(2, dtype=bool))(probs)
    estimate = calibrator.estimator(np.zeros(2, dtype=bool), ["first_only", "deep_only"])
    first, below = estimate(probs), estimate(probs, deep=True)
    assert first[0, 0] > shared[0, 0] + 0.2 and below[0, 0] < shared[0, 0] - 0.2
    assert first[1, 0] < shared[1, 0] - 0.2 and below[1, 0] > shared[1, 0] + 0.2
    rows = calibrator.row_estimator([False, False], ["first_only", "deep_only"])
    assert np.allclose([rows(0, [0.5, 0.1], False), rows(0, [0.5, 0.1], True)], [first[0], below[0]])
    scales = calibrator.deep_scales(["first_only", "deep_only", "new"])
    assert scales[0] < 0.3 and scales[1] == scales[2] == 1.0
    calibrator.retain([])
    assert calibrator.finished_request_rates[0][0] == 0.5, "the rate counts both layers' first-rank outcomes"
