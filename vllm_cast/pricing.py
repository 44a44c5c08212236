"""What a CAST step costs, in seconds, and whether it beats plain decoding.

Prices come from step cost curves (the cost table, with or without the measured
overheads of vllm_cast.step_overheads). The proposer uses them to keep or decline a step's
trees, to judge whether any speculation can pay at a batch size (if not, the draft model
does not run at all), and to record the table's prediction the runner compares with the
measured step time."""

from __future__ import annotations

import logging

from vllm_cast.cost_model import StepCosts

logger = logging.getLogger("vllm_cast")


def first_pass_seconds(costs: StepCosts, rows: float) -> float:
    """Seconds of the causal first pass over ``rows`` rows per request (the verified tokens,
    plus replayed ones after dormancy; linear beyond the table)."""
    causal = costs.seconds.causal_draft
    widest = causal.size - 1
    return float(causal[min(max(round(rows), 1), widest)] * max(rows / widest, 1.0))


def layer_seconds(costs: StepCosts, forwarded_widths: list[int]) -> float:
    """Seconds of one draft pass per tree layer of the given widths."""
    draft = costs.seconds.draft
    return float(sum(draft[w] for w in forwarded_widths))


def draft_seconds(costs: StepCosts, forwarded_widths: list[int], first_pass_rows: float) -> float:
    """Seconds of a step's draft passes: the first pass and the tree layers."""
    return first_pass_seconds(costs, first_pass_rows) + layer_seconds(costs, forwarded_widths)


def verify_seconds(costs: StepCosts, verified: int, chains: bool) -> float:
    """Seconds of the target forward verifying ``verified`` draft nodes per request (chains
    through the causal curve, trees through the masked one)."""
    curve = costs.seconds.verify(chains)
    return float(curve[min(1 + verified, curve.size - 1)])


def beats_plain_decoding(costs: StepCosts, forwarded_widths: list[int], expected_accepted: float, verified: int,
                         chains: bool) -> bool:
    """Whether a step that drafted ``forwarded_widths`` layers and verifies ``verified``
    nodes yields more expected tokens per second than plain decoding: (1 + expected
    accepted tokens) / (draft passes + verification) >= 1 / plain step (``costs.target[1]``)."""
    emitted = 1.0 + expected_accepted  # also the next first pass's rows per request
    speculative = draft_seconds(costs, forwarded_widths, emitted) + verify_seconds(costs, verified, chains)
    plain = costs.plain_step_seconds
    logger.debug("CAST gate: widths %s verified %d: %.2f tokens in %.2f ms vs 1 token in %.2f ms",
                 forwarded_widths, verified, emitted, 1e3 * speculative, 1e3 * plain)
    return emitted * plain >= speculative


def prompt_pass_pays(costs: StepCosts, prompt_rows: float, new_tokens: float, acceptance_rate: float) -> bool:
    """Whether speculating could ever repay the draft's first pass over a request's prompt
    of ``prompt_rows`` rows (priced at the costs' batch size, per request): at best it saves
    the fraction ``acceptance_rate`` (``a``) of the plain steps of its ``new_tokens`` tokens
    (an endless chain accepting each node with ``a``, drafted and verified for free, emits
    ``1 / (1 - a)`` tokens a step)."""
    return first_pass_seconds(costs, prompt_rows) <= acceptance_rate * new_tokens * costs.plain_step_seconds


def no_chain_can_pay(costs: StepCosts, acceptance_rate: float, max_depth: int) -> bool:
    """Whether no chain of depth 1..``max_depth`` whose nodes are each accepted with
    ``acceptance_rate`` beats plain decoding: ``1 + a + ... + a^d`` tokens never pay for
    the first pass over them, ``d - 1`` chain layers and verifying ``d`` tokens causally."""
    chain = costs.seconds.chain_target
    plain = costs.plain_step_seconds
    for depth in range(1, min(max_depth, chain.size - 2) + 1):
        expected = sum(acceptance_rate**i for i in range(depth + 1))
        drafting = first_pass_seconds(costs, expected) + (depth - 1) * float(costs.seconds.draft[1])
        if expected * plain >= drafting + float(chain[depth + 1]):
            return False
    return True
