"""Keeping the rows of requests CAST never drafts out of the draft model's first pass.

EAGLE's first pass runs the draft model over every target row of the step, so that the draft
KV cache stays complete for the request's next trees. A request CAST will never draft
(undrafted while speculation is hopeless, or needing logits processing) has no next tree:
its rows would be drafted for nothing, and a new prompt's are its whole prompt (15 prompts
joining a batch that verified drafts ran the draft over ~1,900 rows: 189 ms against plain
decoding's 132 ms for the step). Such a request keeps only its sampled row, so the batch
keeps one query per request and every per-request shape downstream stays as it is.

A step's trees are priced with the first pass a speculative step pays in steady state
(``recurring_first_pass_rows``), not with this step's: a new prompt's rows, and rows
replayed after dormancy, are paid once whatever is drafted now."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata


def drafted_rows_only(draftable: list[bool] | None, tokens: torch.Tensor, positions: torch.Tensor,
                      hidden: torch.Tensor, sample_rows: torch.Tensor | None, cad: CommonAttentionMetadata):
    """The first pass's inputs without the rows of requests that are not ``draftable``
    (``[B]``), except each one's sampled row: tokens/positions ``[T]``, hidden ``[T, A]``,
    each request's sampled row ``[B]`` (None: its last row) and the attention metadata.
    Returns them in the same order, rows of the kept requests unchanged; the same objects
    when every request is draftable or none has rows to spare."""
    unchanged = tokens, positions, hidden, sample_rows, cad
    if draftable is None or all(draftable) or len(draftable) != cad.num_reqs:
        return unchanged
    starts = cad.query_start_loc_cpu.numpy().astype(np.int64)
    sampled = starts[1:] - 1 if sample_rows is None else sample_rows.cpu().numpy().astype(np.int64)
    kept = np.array(draftable, dtype=bool)
    lengths = np.where(kept, starts[1:] - starts[:-1], 1)
    if int(lengths.sum()) == tokens.shape[0]:
        return unchanged
    pieces = [np.arange(starts[i], starts[i + 1]) if kept[i] else sampled[i : i + 1] for i in range(kept.size)]
    rows = torch.from_numpy(np.concatenate(pieces)).to(tokens.device)
    new_starts = np.concatenate([[0], np.cumsum(lengths)])
    new_sampled = np.where(kept, new_starts[:-1] + (sampled - starts[:-1]), new_starts[:-1])
    query_start = torch.from_numpy(new_starts.astype(np.int32))
    trimmed_cad = dataclasses.replace(
        cad, query_start_loc=query_start.to(cad.query_start_loc.device), query_start_loc_cpu=query_start,
        num_actual_tokens=int(new_starts[-1]), max_query_len=int(lengths.max()),
        slot_mapping=cad.slot_mapping[rows.to(cad.slot_mapping.device)], positions=None, logits_indices_padded=None)
    return (tokens[rows], positions[rows], hidden[rows],
            torch.from_numpy(new_sampled).to(dtype=torch.int32, device=tokens.device), trimmed_cad)


def recurring_first_pass_rows(query_start_loc: torch.Tensor, most_per_request: int) -> float:
    """Rows per request, on average, that a first pass with these query offsets (``[B + 1]``,
    CPU) reads in steady state: each request's rows, at most ``most_per_request`` (what a
    verified tree can emit: its depth plus the bonus token). Priced with every row of a
    4-request step that carried one 300-token prompt, the "auto" depth threshold (the
    step's expected tokens per cost so far) fell so low that the step's trees went 6
    layers deep, and the decline gate, which prices the next first pass, then dropped them
    (closed loop of 4 clients with 32-token requests: 8.6 ms of drafting in such steps
    against 2.7 ms in decode steps)."""
    starts = query_start_loc.tolist()  # in Python: numpy's first calls after a forward took ~40 us
    return sum(min(end - start, most_per_request) for start, end in zip(starts, starts[1:])) / (len(starts) - 1)
