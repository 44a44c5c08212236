"""Profile target and draft forward latency through vLLM's own model code and attention
backends, inside the worker, to build CAST's cost table.

A measured cell is one forward of ``B`` sequences with ``c`` cached tokens and ``n`` new
tokens each, laid out in free KV blocks (the profile runs before any request). Multi-token
target forwards and all draft forwards run under a tree plan, i.e. through the same
masked-attention path that tree verification and tree drafting use; the logits of every
new token are computed, as in verification."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_cast.attention.tree_plan import TreePlan, TreeRequest, active_plan

BATCH_GRID = (1, 2, 4, 8, 16, 32)
CONTEXT_GRID = (128, 512, 2048)
TOKEN_GRID = (1, 2, 4, 8, 16, 32, 64, 129)


def grids(max_batch: int, max_model_len: int, max_tokens: int, free_blocks: int,
          block_size: int) -> tuple[list[int], list[int], list[int]]:
    """The profiled (batch sizes, contexts, new-token counts), clipped to the engine's
    limits and to what fits in the free KV blocks."""
    tokens = sorted({n for n in TOKEN_GRID if n < max_tokens} | {max_tokens})
    contexts = [c for c in CONTEXT_GRID if c + max_tokens <= max_model_len] or [max(1, max_model_len - max_tokens)]
    per_sequence = -(-(contexts[-1] + max_tokens) // block_size)
    batches = [b for b in BATCH_GRID if b <= max_batch and b * per_sequence <= free_blocks] or [1]
    return batches, contexts, tokens


def _layout(batch: int, context: int, new_tokens: int, block_size: int, device: torch.device,
            table_width: int) -> CommonAttentionMetadata:
    """Attention metadata for the cell, sequences in consecutive blocks from block 1."""
    length = context + new_tokens
    per_sequence = -(-length // block_size)
    blocks = torch.zeros(batch, table_width, dtype=torch.int32)
    blocks[:, :per_sequence] = 1 + torch.arange(batch * per_sequence, dtype=torch.int32).view(batch, per_sequence)
    positions = (context + torch.arange(new_tokens)).repeat(batch)
    rows = torch.arange(batch).repeat_interleave(new_tokens)
    slots = blocks[rows, positions // block_size].long() * block_size + positions % block_size
    query_start = torch.arange(batch + 1, dtype=torch.int32) * new_tokens
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=seq_lens.to(device),
        num_reqs=batch, num_actual_tokens=batch * new_tokens, max_query_len=new_tokens, max_seq_len=length,
        block_table_tensor=blocks.to(device), slot_mapping=slots.to(device), positions=positions.to(device))


def tree_plan_for(batch: int, context: int, new_tokens: int) -> TreePlan:
    """A causal mask expressed as a tree plan: same cost as any tree of that size."""
    mask = torch.ones(new_tokens, new_tokens, dtype=torch.bool).tril()
    return TreePlan(tuple(TreeRequest(b, context, mask) for b in range(batch)))


def warm_seconds(run: Callable[[], None], synchronize: Callable[[], None]) -> float:
    """Wall time of a call of ``run`` right after an untimed one (the caches hold its
    weights, as they do for a decode step after the step before it)."""
    run()
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


class ForwardTimers:
    """Timers ``(B, c, n) -> seconds`` of one warm forward of a CAST runner's target and
    draft models."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.drafter = runner.drafter
        self.block_size = runner.input_batch.block_table.block_tables[0].block_size
        self.table_width = runner.input_batch.block_table.block_tables[0].block_table.cpu.shape[1]
        device = runner.device
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def _time(self, run: Callable[[], None]) -> float:
        """``run`` timed warm (``warm_seconds``) in inference mode, as vLLM's runner runs its
        forwards. On the 2-core EPYC, B=4 plain forwards took 2.0 ms warm and 2.75 ms timed
        right after other cells' forwards (their weights out of the caches), and 0.2-0.3 ms
        more with autograd on (B=8 plain 2.70 against 2.42 ms): either priced plain steps
        above the real ones."""
        with torch.inference_mode():
            return warm_seconds(run, self.synchronize)

    def _metadata(self, batch: int, context: int, new_tokens: int) -> CommonAttentionMetadata:
        return _layout(batch, context, new_tokens, self.block_size, self.runner.device, self.table_width)

    def target(self, batch: int, context: int, new_tokens: int, tree: bool = True) -> float:
        """One target forward; multi-token ones tree-masked unless ``tree`` is False."""
        return self._time(self._target_forward(batch, context, new_tokens, tree))

    def _target_forward(self, batch: int, context: int, new_tokens: int, tree: bool) -> Callable[[], None]:
        """A callable running the target forward of :meth:`target`, logits of every row included."""
        runner = self.runner
        cad = self._metadata(batch, context, new_tokens)
        plan = tree_plan_for(batch, context, new_tokens) if new_tokens > 1 and tree else None
        with active_plan(plan):
            per_layer = {name: group.build_metadata(cad) for groups in runner.attn_groups
                         for group in groups for name in group.layer_names}
        count = cad.num_actual_tokens
        input_ids = torch.zeros(count, dtype=torch.int32, device=runner.device)

        def run() -> None:
            with set_forward_context(per_layer, runner.vllm_config, num_tokens=count,
                                     cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                     slot_mapping={name: cad.slot_mapping for name in per_layer}):
                output = runner.model(input_ids=input_ids, positions=cad.positions)
                hidden = output[0] if isinstance(output, tuple) else output
                runner.model.compute_logits(hidden)

        return run

    def chain_target(self, batch: int, context: int, new_tokens: int) -> float:
        """One target forward verifying chains (causal attention)."""
        return self.target(batch, context, new_tokens, tree=False)

    def draft(self, batch: int, context: int, new_tokens: int, tree: bool = True) -> float:
        """One draft forward: one token per sequence causal, more under a tree mask unless
        ``tree`` is False."""
        return self._time(self._draft_forward(batch, context, new_tokens, tree))

    def _draft_forward(self, batch: int, context: int, new_tokens: int, tree: bool) -> Callable[[], None]:
        """A callable running the draft forward of :meth:`draft`, logits of every row included."""
        drafter = self.drafter
        cad = self._metadata(batch, context, new_tokens)
        with active_plan(tree_plan_for(batch, context, new_tokens) if new_tokens > 1 and tree else None):
            _, per_layer = drafter.build_per_group_and_layer_attn_metadata(cad)
        count = cad.num_actual_tokens
        input_ids = torch.zeros(count, dtype=torch.int32, device=drafter.device)
        hidden = torch.zeros(count, drafter.hidden_size, dtype=drafter.dtype, device=drafter.device)

        def run() -> None:
            with set_forward_context(per_layer, drafter.vllm_config, num_tokens=count,
                                     cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                     slot_mapping=drafter._get_slot_mapping(count, cad.slot_mapping)):
                normed, _ = drafter.model(input_ids=input_ids, positions=cad.positions, hidden_states=hidden)
                drafter.model.compute_logits(normed)

        return run

    def chain_draft(self, batch: int, context: int, new_tokens: int) -> float:
        """One draft forward over causal rows (EAGLE's first pass over verified tokens)."""
        return self.draft(batch, context, new_tokens, tree=False)
