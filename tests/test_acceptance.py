"""Online acceptance calibration (vllm_cast.acceptance), per verification mode."""

from __future__ import annotations

import torch

from vllm_cast.acceptance import MIN_RATE_TRIALS, AcceptanceCalibrator


def test_greedy_and_sampled_acceptance_are_learned_apart():
    calibrator = AcceptanceCalibrator()
    generator = torch.Generator().manual_seed(0)
    n = 400
    probs = torch.full((n,), 0.07)
    for sampled, rate in ((False, 0.8), (True, 0.2)):
        outcomes = torch.rand(n, generator=generator) < rate
        calibrator.record(probs, torch.zeros(n, dtype=torch.int64), outcomes, torch.full((n,), sampled))
    greedy_rate, sampled_rate = calibrator.first_rank_rate(False), calibrator.first_rank_rate(True)
    assert abs(greedy_rate - 0.8) < 0.06 and abs(sampled_rate - 0.2) < 0.06
    estimates = calibrator(torch.tensor([[0.07, 0.01], [0.07, 0.01]]), sampled=torch.tensor([False, True]))
    assert abs(float(estimates[0, 0]) - greedy_rate) < 0.02 and abs(float(estimates[1, 0]) - sampled_rate) < 0.02
    assert abs(float(estimates[0, 1]) - 0.01) < 1e-6, "unseen cells keep the raw draft probability"


def test_no_rate_before_enough_outcomes():
    calibrator = AcceptanceCalibrator()
    few = MIN_RATE_TRIALS - 1
    calibrator.record(torch.full((few,), 0.5), torch.zeros(few, dtype=torch.int64), torch.ones(few, dtype=torch.bool),
                      torch.zeros(few, dtype=torch.bool))
    assert calibrator.first_rank_rate(False) is None
