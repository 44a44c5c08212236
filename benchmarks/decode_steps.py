"""Prompts run through an offline engine's own step loop, counting what each step emits.

vLLM's spec-decode counters count a draft token as accepted even past ``max_tokens``, where
the request never emits it: its chains draft a full ``num_speculative_tokens`` on a
request's last step (CAST drafts no more than a request can still emit). Counted from the
output instead, tokens per step mean the same for every engine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

_request_numbers = itertools.count()


@dataclass
class DecodeCount:
    """Emitted tokens and decode steps of a group of requests."""

    tokens: int = 0
    """Tokens the requests emitted, the prompt step's included."""
    requests: int = 0
    decode_steps: int = 0
    """Request-steps after the prompt step's token (one per request per engine step)."""

    def __iadd__(self, other: DecodeCount) -> DecodeCount:
        self.tokens += other.tokens
        self.requests += other.requests
        self.decode_steps += other.decode_steps
        return self

    @property
    def tokens_per_step(self) -> float:
        """Tokens a request emits per decode step (bonus token included; 1 for plain decoding)."""
        return (self.tokens - self.requests) / self.decode_steps if self.decode_steps else 1.0

    def accepted_per_draft(self, drafts: float) -> float:
        """Mean accepted length (bonus included) over ``drafts`` drafting request-steps:
        every decode step emits one token besides the draft tokens it accepted."""
        return 1 + (self.tokens - self.requests - self.decode_steps) / drafts if drafts else 1.0


def generate_counting_steps(llm, prompts: list[str], params: SamplingParams) -> DecodeCount:
    """Decode ``prompts`` together with ``params`` through ``llm``'s engine, step by step."""
    engine = llm.llm_engine
    delta_params = params.clone()
    delta_params.output_kind = RequestOutputKind.DELTA
    for prompt in prompts:
        engine.add_request(f"counted-{next(_request_numbers)}", prompt, delta_params)
    count = DecodeCount(requests=len(prompts))
    decoding: set[str] = set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            emitted = len(output.outputs[0].token_ids)
            if not emitted:
                continue
            count.tokens += emitted
            if output.request_id in decoding:
                count.decode_steps += 1
            else:  # the prompt step's token
                decoding.add(output.request_id)
    return count
