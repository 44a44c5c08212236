"""Tree acceptance for one verification forward: replaces vLLM's chain rejection sampler.

For every request the target's token is drawn at each tree node (argmax when greedy; a
sample from the temperature / top-k / top-p distribution otherwise); walking from the
root, a node is accepted while the token drawn at its parent equals its own token. The
emitted tokens are the accepted path plus the token drawn at its last node. Each emitted
token is thus a fresh draw of the target's conditional given what precedes it, so the
output distribution is the target's exactly (for greedy: the target argmax chain).

Requests whose sampling needs per-history logits processing (penalties, bad words, min
tokens, logit bias, allowed tokens, min-p, structured output) are never given drafts by
CAST; for them (and for any request with zero drafts) the emitted token comes from vLLM's
own sampler on the request's first row, exactly as plain decoding would produce it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.sampler import Sampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_cast.verify import walk_matches

PLACEHOLDER_TOKEN_ID = -1
GREEDY_EPS = 1e-5


def needs_logits_processing(params: SamplingParams) -> bool:
    """Whether a request's next-token distribution depends on more than its raw logits,
    temperature, top-k and top-p (CAST then gives it no drafts)."""
    return bool(
        params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        or params.bad_words or params.min_tokens or params.logit_bias or params.allowed_token_ids
        or (params.min_p and params.temperature >= GREEDY_EPS) or params.structured_outputs is not None
        or params.logprob_token_ids)


@dataclass
class TreeVerdicts:
    """Per request: ``paths[r]`` the accepted draft nodes (tree indices, root excluded,
    root to leaf) and ``tokens[r]`` the emitted tokens (``len(paths[r]) + 1``)."""

    paths: list[list[int]]
    tokens: list[list[int]]


def _node_tokens(logits: torch.Tensor, request: int, metadata: SamplingMetadata) -> torch.Tensor:
    """The target's draw at each of one request's rows ``[R, V]`` -> ``[R]``."""
    temperature = None if metadata.temperature is None else float(metadata.temperature[request])
    if metadata.all_greedy or temperature is None or temperature < GREEDY_EPS:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    rows = scaled.shape[0]
    top_k = None if metadata.top_k is None else metadata.top_k[request].expand(rows)
    top_p = None if metadata.top_p is None else metadata.top_p[request].expand(rows)
    probs = apply_top_k_top_p(scaled, top_k, top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=metadata.generators.get(request))
    return (probs / race).argmax(-1)


def verify_trees(logits: torch.Tensor, spec: SpecDecodeMetadata, parents: list[list[int] | None],
                 plain: list[bool], metadata: SamplingMetadata, sampler: Sampler) -> tuple[SamplerOutput, TreeVerdicts]:
    """Tree acceptance for a batch.

    logits ``[sum(1 + N_r), V]``: request ``r``'s rows are its root and ``N_r`` draft nodes
    in tree order. parents[r]: the tree's parent list over ``1 + N_r`` nodes (None: a chain).
    plain[r]: False for requests whose sampling needs logits processing (see module doc).
    Returns vLLM's SamplerOutput (``[num_reqs, 1 + max N]`` int32, -1 padded, logprobs of
    emitted tokens when requested) and the verdicts."""
    num_drafts = spec.num_draft_tokens
    if not any(num_drafts):  # plain decoding step: vLLM's sampler, untouched
        output = sampler(logits, metadata)
        tokens = output.sampled_token_ids[:, 0].tolist()
        return output, TreeVerdicts(paths=[[] for _ in tokens], tokens=[[t] for t in tokens])
    starts = [0]
    for n in num_drafts:
        starts.append(starts[-1] + n + 1)
    # Greedy: every request's draws at once (see _node_tokens).
    drawn_rows = logits.argmax(-1).tolist() if metadata.all_greedy else None
    first_draws = None  # vLLM's draw at each request's first row: for requests taking no drafts
    if drawn_rows is None or any(n == 0 or not is_plain for n, is_plain in zip(num_drafts, plain)):
        first_rows = torch.tensor(starts[:-1], device=logits.device)
        first_draws = sampler(logits[first_rows], replace(metadata, max_num_logprobs=None)).sampled_token_ids[:, 0].tolist()
    draft_ids = spec.draft_token_ids.tolist()
    verdicts = TreeVerdicts(paths=[], tokens=[])
    for r, n in enumerate(num_drafts):
        if n == 0 or not plain[r]:
            verdicts.paths.append([])
            verdicts.tokens.append([first_draws[r]])
            continue
        offset = starts[r] - r  # draft tokens are packed without roots
        tokens = [-1] + draft_ids[offset : offset + n]
        tree_parents = parents[r] or list(range(-1, n))
        drawn = (drawn_rows[starts[r] : starts[r + 1]] if drawn_rows is not None
                 else _node_tokens(logits[starts[r] : starts[r + 1]], r, metadata).tolist())
        verdict = walk_matches(tokens, tree_parents, drawn)  # the walk is the same for argmax and sampled draws
        verdicts.paths.append(verdict.accepted)
        verdicts.tokens.append(verdict.tokens)
    width = 1 + max(num_drafts)
    sampled = torch.tensor([emitted + [PLACEHOLDER_TOKEN_ID] * (width - len(emitted)) for emitted in verdicts.tokens],
                           dtype=torch.int32)
    logprobs = None
    if metadata.max_num_logprobs is not None:
        logprobs = _emitted_logprobs(logits, starts, verdicts, width, metadata.max_num_logprobs, sampler)
    return SamplerOutput(sampled_token_ids=sampled.to(logits.device), logprobs_tensors=logprobs), verdicts


def _emitted_logprobs(logits: torch.Tensor, starts: list[int], verdicts: TreeVerdicts, width: int,
                      num_logprobs: int, sampler: Sampler):
    """Logprobs (raw, as vLLM's default mode) of every emitted token, laid out
    ``[num_reqs * width]`` like the chain sampler's so vLLM's parser filters them."""
    rows = torch.zeros(len(verdicts.tokens), width, dtype=torch.int64)
    tokens = torch.zeros_like(rows)
    for r, (path, emitted) in enumerate(zip(verdicts.paths, verdicts.tokens)):
        emitting_nodes = [0] + path  # token j is drawn after node j of the path
        rows[r, : len(emitted)] = torch.tensor(emitting_nodes) + starts[r]
        tokens[r, : len(emitted)] = torch.tensor(emitted)
    selected = logits[rows.flatten().to(logits.device)].float()
    scores = selected if sampler.logprobs_mode == "raw_logits" else sampler.compute_logprobs(selected)
    return sampler.gather_logprobs(scores, num_logprobs, tokens.flatten().to(logits.device))
