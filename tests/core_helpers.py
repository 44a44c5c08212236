"""Synthetic draft models and cost curves for engine-independent tests."""

from __future__ import annotations

import hashlib

import torch

from vllm_cast.cost_model import StepCosts


def synthetic_draft(vocab: int, concentration: float = 0.3, seed: int = 0):
    """A deterministic 'draft model': root path (tuple of tokens) -> peaky probabilities
    ``[vocab]`` drawn from a Dirichlet seeded by the path."""

    def draft(path: tuple[int, ...]) -> torch.Tensor:
        digest = hashlib.sha256(repr((seed, path)).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        gamma = torch._standard_gamma(torch.full((vocab,), concentration, dtype=torch.float64), generator=generator)
        return (gamma / gamma.sum()).float()

    return draft


def linear_costs(max_tokens: int, draft_slope: float, draft_base: float, target_slope: float,
                 target_base: float = 1.0) -> StepCosts:
    """Affine cost curves: draft[n] = base + slope*n, target[n] likewise; index 0 is 0."""
    n = torch.arange(max_tokens + 1, dtype=torch.float64)
    draft = torch.where(n > 0, draft_base + draft_slope * n, 0.0)
    target = torch.where(n > 0, target_base + target_slope * n, 0.0)
    return StepCosts(draft=draft, target=target)
