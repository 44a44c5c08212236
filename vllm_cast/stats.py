"""Running statistics of CAST's per-step tree decisions (for logs and the ``cast_stats``
worker RPC; vLLM's own spec-decode metrics count drafts and accepted tokens)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from vllm_cast.tree_builder import StepDecision

logger = logging.getLogger("vllm_cast")
LOG_EVERY_STEPS = 200


@dataclass
class CastStats:
    steps: int = 0
    """Drafting steps seen."""
    speculating_steps: int = 0
    """Steps that drafted at least one node for some request."""
    depth_sum: int = 0
    max_depth: int = 0
    max_width: int = 0
    declined_steps: int = 0
    """Steps whose trees were dropped because plain decoding was priced faster."""
    chain_steps: int = 0
    """Steps drafted by the chain builder (vllm_cast.chain_builder)."""
    verified_sum: int = 0
    """Nodes chosen for verification, summed over requests and steps."""
    requests_sum: int = 0
    batch_size_sum: int = 0
    verified_drafts: int = 0
    """Request-steps that verified at least one draft node (vLLM's "num_drafts")."""
    accepted_tokens: int = 0
    """Draft tokens accepted in those (bonus tokens excluded)."""
    timed_steps: int = 0
    measured_step_seconds: float = 0.0
    """Wall time of engine steps (target forward + acceptance + drafting), summed."""
    predicted_step_seconds: float = 0.0
    """The cost table's prediction for the same steps, summed."""
    priced_step_seconds: float = 0.0
    """CAST's price for the same steps (the table plus measured overheads), summed."""

    def record(self, decision: StepDecision, batch_size: int) -> None:
        self.steps += 1
        self.batch_size_sum += batch_size
        self.requests_sum += len(decision.verified)
        self.verified_sum += sum(decision.verified)
        self.declined_steps += decision.declined
        self.chain_steps += decision.chain_step
        if any(decision.verified):
            self.speculating_steps += 1
            self.depth_sum += decision.depth
            self.max_depth = max(self.max_depth, decision.depth)
            self.max_width = max(self.max_width, *decision.widths)
        logger.debug("CAST step: batch %d widths %s verified %s expected accepted %.2f",
                     batch_size, decision.widths, decision.verified, decision.expected_accepted)
        if self.steps % LOG_EVERY_STEPS == 0:
            logger.info("CAST: %s", self.summary())

    def record_verification(self, draft_counts: list[int], accepted_counts: list[int]) -> None:
        """One verification step: draft nodes and accepted nodes per request."""
        self.verified_drafts += sum(1 for n in draft_counts if n > 0)
        self.accepted_tokens += sum(a for n, a in zip(draft_counts, accepted_counts) if n > 0)

    def record_step_time(self, measured: float, predicted: float, priced: float) -> None:
        """One speculative step's wall time against the table's and CAST's price (seconds)."""
        self.timed_steps += 1
        self.measured_step_seconds += measured
        self.predicted_step_seconds += predicted
        self.priced_step_seconds += priced

    def summary(self) -> dict[str, float]:
        """Totals plus means: depth per speculating step, verified nodes per request,
        batch size per step, tokens per verifying request-step (bonus included)."""
        out: dict[str, float] = asdict(self)
        out["mean_depth"] = self.depth_sum / max(1, self.speculating_steps)
        out["mean_verified_per_request"] = self.verified_sum / max(1, self.requests_sum)
        out["mean_batch_size"] = self.batch_size_sum / max(1, self.steps)
        out["mean_measured_step_ms"] = 1e3 * self.measured_step_seconds / max(1, self.timed_steps)
        out["mean_predicted_step_ms"] = 1e3 * self.predicted_step_seconds / max(1, self.timed_steps)
        out["mean_priced_step_ms"] = 1e3 * self.priced_step_seconds / max(1, self.timed_steps)
        out["mean_accepted_length"] = 1 + self.accepted_tokens / max(1, self.verified_drafts)
        return out
