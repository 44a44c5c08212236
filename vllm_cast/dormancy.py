"""Skipping the draft model while CAST does not speculate, without losing its KV cache.

When CAST's decision for a step is "no tree for anyone", running EAGLE's draft pass every
step only to keep the draft KV cache complete can cost more than speculation ever wins
back (on CPU the one-layer head costs a third of a small target). CAST then goes dormant:
for the next few steps the draft model does not run and the target rows it would have
read (token, position, auxiliary hidden states) are kept per request. The next drafting
step (a probe) replays them in front of its own rows
in one batched first pass, so the draft KV cache ends up exactly as if the draft had run
every step. The runner decides before a step's forward that it is dormant and runs it as
vLLM's plain decoding, only collecting the auxiliary hidden states and copying the rows
(through vLLM's speculative path a dormant greedy B=4 step took 3.18 ms against vanilla's
2.82; now 3.08 against 2.90, 0.06 ms of it the copies). The dormant stretch backs off
exponentially: 1 step after a speculating step, doubling with each probe that again chooses
no tree, up to ``probe_interval`` steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata


@dataclass
class _Rows:
    """One request's remembered target rows: tokens ``[n]``, positions ``[n]``, auxiliary
    hidden states ``[n, A]``."""

    tokens: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor


@dataclass
class _StepRows:
    """One dormant step's rows for the whole batch, as the runner had them: request ids,
    query offsets ``[B + 1]``, tokens/positions ``[T]`` and hidden ``[T, A]``."""

    req_ids: list[str]
    query_start_loc: list[int]
    rows: _Rows


class DraftDormancy:
    """Dormancy state of one proposer (see module doc). Rows are kept per step while the
    batch stays the same (one copy per step) and regrouped per request when it changes."""

    def __init__(self, probe_interval: int, max_rows: int) -> None:
        self.probe_interval = probe_interval
        self.max_rows = max_rows
        self.next_interval = 1
        self.steps_left = 0
        self.stash: dict[str, _Rows] = {}
        self.recent_steps: list[_StepRows] = []
        self.stashed_rows = 0

    def enter(self) -> None:
        """CAST chose no tree: skip drafting for a while (backing off)."""
        self.steps_left = self.next_interval
        self.next_interval = min(2 * self.next_interval, self.probe_interval)

    def wake(self) -> None:
        """CAST chose a tree: the next dormant stretch starts short again."""
        self.next_interval = 1

    def restart(self) -> None:
        """Speculation is to be measured afresh: end the dormant stretch and start backing off
        from 1 again (a 64-step stretch left from earlier declines kept a whole greedy B=4
        wave dormant right after its batch size's verdict went stale)."""
        self.steps_left = 0
        self.wake()

    def fits(self, new_rows: int) -> bool:
        """Whether the remembered rows plus this step's ``new_rows`` (twice, to leave room at
        wake-up) fit the drafter's buffers."""
        return self.stashed_rows + 2 * new_rows <= self.max_rows

    def should_skip(self, new_rows: int) -> bool:
        """Whether this step may skip the draft: dormant, and its rows fit (:meth:`fits`)."""
        skip = self.steps_left > 0 and self.fits(new_rows)
        self.steps_left = max(self.steps_left - 1, 0) if skip else 0
        return skip

    def forget(self) -> None:
        """Drop every remembered row (their requests will not be drafted again)."""
        self.stash, self.recent_steps, self.stashed_rows = {}, [], 0

    def remember(self, req_ids: list[str], tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                 query_start_loc: list[int]) -> None:
        """Keep this step's rows (tokens/positions ``[T]``, hidden ``[T, A]``; kept as given,
        so the caller passes copies)."""
        if self.recent_steps and req_ids != self.recent_steps[-1].req_ids:
            self.remembered(req_ids)
        self.recent_steps.append(_StepRows(list(req_ids), query_start_loc, _Rows(tokens, positions, hidden)))
        self.stashed_rows += tokens.numel()

    def remembered(self, req_ids: list[str]) -> dict[str, _Rows]:
        """Each of ``req_ids``' remembered rows, in position order. Rows that do not continue
        a request's earlier ones (it was preempted and recomputed) replace them; requests
        not in ``req_ids`` (finished, preempted) are forgotten."""
        wanted = set(req_ids)
        pieces = {req_id: [rows] for req_id, rows in self.stash.items() if req_id in wanted}
        for step in self.recent_steps:
            for index, req_id in enumerate(step.req_ids):
                if req_id not in wanted:
                    continue
                rows = slice(step.query_start_loc[index], step.query_start_loc[index + 1])
                new = _Rows(step.rows.tokens[rows], step.rows.positions[rows], step.rows.hidden[rows])
                earlier = pieces.get(req_id)
                if earlier is not None and int(earlier[-1].positions[-1]) + 1 == int(new.positions[0]):
                    earlier.append(new)
                else:
                    pieces[req_id] = [new]
        self.stash = {req_id: chain[0] if len(chain) == 1 else _Rows(
            *(torch.cat([getattr(p, name) for p in chain]) for name in ("tokens", "positions", "hidden")))
            for req_id, chain in pieces.items()}
        self.recent_steps = []
        self.stashed_rows = sum(rows.tokens.numel() for rows in self.stash.values())
        return self.stash

    def replay(self, req_ids: list[str], tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
               cad: CommonAttentionMetadata, block_size: int):
        """Prepend remembered rows to this step's. Returns (tokens ``[T']``, positions
        ``[T']``, hidden ``[T', A]``, attention metadata, each request's last row ``[B]``),
        or None when nothing is remembered (or it would not fit ``self.max_rows``)."""
        stash = self.remembered(req_ids)
        self.stash, self.stashed_rows = {}, 0
        starts = cad.query_start_loc_cpu.tolist()
        pieces, lengths = [], []
        for index, req_id in enumerate(req_ids):
            rows = slice(starts[index], starts[index + 1])
            current = _Rows(tokens[rows], positions[rows], hidden[rows])
            old = stash.get(req_id)
            if old is not None and int(old.positions[-1]) + 1 == int(current.positions[0]):
                pieces += [old, current]
                lengths.append(old.tokens.numel() + current.tokens.numel())
            else:
                pieces.append(current)
                lengths.append(current.tokens.numel())
        total = sum(lengths)
        if total == tokens.numel() or total > self.max_rows:
            return None
        merged = _Rows(*(torch.cat([getattr(p, name) for p in pieces]) for name in ("tokens", "positions", "hidden")))
        query_start = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(lengths).cumsum(0)
        request_of_row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        table = cad.block_table_tensor.cpu()
        row_positions = merged.positions.cpu().long()
        slots = table[request_of_row, row_positions // block_size].long() * block_size + row_positions % block_size
        device = cad.query_start_loc.device
        merged_cad = CommonAttentionMetadata(
            query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=cad.seq_lens,
            num_reqs=cad.num_reqs, num_actual_tokens=total, max_query_len=max(lengths), max_seq_len=cad.max_seq_len,
            block_table_tensor=cad.block_table_tensor, slot_mapping=slots.to(cad.slot_mapping), causal=True)
        last_rows = (query_start[1:] - 1).to(device)
        return merged.tokens, merged.positions, merged.hidden, merged_cad, last_rows
