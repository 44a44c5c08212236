"""Step prices and the plain-decoding comparisons (vllm_cast.pricing)."""

from __future__ import annotations

import dataclasses

import torch

from vllm_cast import pricing
from vllm_cast.cost_model import StepCosts


def _costs(draft: float, chain_slope: float = 0.1, tree_slope: float = 0.5) -> StepCosts:
    """Plain step 1 s; a draft pass ``draft`` s; verifying n nodes adds n * slope s."""
    n = torch.arange(20, dtype=torch.float64)
    positive = (n > 0).double()
    return StepCosts(draft=draft * positive, target=(1.0 + tree_slope * (n - 1)) * positive,
                     chain_target=(1.0 + chain_slope * (n - 1)) * positive)


def test_step_prices_follow_the_curves():
    costs = _costs(draft=0.2)
    assert abs(pricing.draft_seconds(costs, [1, 2], first_pass_rows=1) - 0.6) < 1e-9
    assert abs(pricing.draft_seconds(costs, [], first_pass_rows=38) - 0.4) < 1e-9, "linear beyond the table"
    assert abs(pricing.verify_seconds(costs, 3, chains=True) - 1.3) < 1e-9
    assert abs(pricing.verify_seconds(costs, 3, chains=False) - 2.5) < 1e-9


def test_the_first_pass_is_priced_causal_and_tree_layers_masked():
    costs = dataclasses.replace(_costs(draft=0.2), chain_draft=0.05 * torch.arange(20, dtype=torch.float64))
    # first pass over 3 rows: causal 0.15 s; layers of widths 1 and 2 on the (masked) draft curve: 0.4 s
    assert abs(pricing.draft_seconds(costs, [1, 2], first_pass_rows=3) - 0.55) < 1e-9


def test_a_step_is_kept_only_when_it_beats_plain_decoding():
    # draft 2 passes (0.4 s) + verify a 2-chain (1.2 s) = 1.6 s: needs >= 1.6 tokens
    assert pricing.beats_plain_decoding(_costs(0.2), [1], expected_accepted=0.7, verified=2, chains=True)
    assert not pricing.beats_plain_decoding(_costs(0.2), [1], expected_accepted=0.5, verified=2, chains=True)
    assert not pricing.beats_plain_decoding(_costs(0.2), [1], expected_accepted=0.7, verified=2, chains=False)


def test_no_chain_can_pay_when_drafting_costs_more_than_it_can_return():
    assert pricing.no_chain_can_pay(_costs(draft=0.9), acceptance_rate=0.6, max_depth=6)
    assert not pricing.no_chain_can_pay(_costs(draft=0.1), acceptance_rate=0.6, max_depth=6)
    assert not pricing.no_chain_can_pay(_costs(draft=0.5), acceptance_rate=0.99, max_depth=6)
    assert pricing.no_chain_can_pay(_costs(draft=0.5), acceptance_rate=0.3, max_depth=6)


def test_a_prompt_pass_pays_only_if_speculation_could_save_as_much():
    costs = dataclasses.replace(_costs(draft=0.2), chain_draft=0.01 * torch.arange(20, dtype=torch.float64))
    # first pass over 190 prompt rows: 0.19 s x 10 (linear beyond the table) = 1.9 s; a plain step 1 s
    assert pricing.prompt_pass_pays(costs, prompt_rows=190, new_tokens=4, acceptance_rate=0.5), "saves up to 2 s"
    assert not pricing.prompt_pass_pays(costs, prompt_rows=190, new_tokens=3, acceptance_rate=0.5), "saves 1.5 s"
    assert not pricing.prompt_pass_pays(costs, prompt_rows=190, new_tokens=64, acceptance_rate=0.0)
