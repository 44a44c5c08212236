"""CAST's CPU tree attention and KV moves against vLLM's own cache writer and torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_cast.attention.cpu_kv_layout import key_view, move_tokens, value_view
from vllm_cast.attention.paged_tree_attention import paged_tree_attention, prepare_tree
from vllm_cast.attention.tree_plan import TreePlan, TreeRequest
from vllm_cast.tree import ancestor_mask

BLOCK, HEADS, QUERY_HEADS, DIM = 32, 2, 4, 64


def _write(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """Store tokens with vLLM's own CPU cache writer (``vec`` layout)."""
    from vllm import _custom_ops as ops

    view = cache.view(cache.shape[0], HEADS, BLOCK * 2, DIM)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")


def _random_parents(count: int, generator: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, count)]
    return torch.tensor(parents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_matches_sdpa_reference(dtype):
    generator = torch.Generator().manual_seed(7)
    blocks_per_request, requests = 4, 3
    cache = torch.zeros(1 + requests * blocks_per_request, HEADS, BLOCK, 2 * DIM, dtype=dtype)
    block_table = 1 + torch.arange(requests * blocks_per_request, dtype=torch.int32).view(requests, -1)
    contexts, sizes = [37, 64, 90], [5, 1, 9]
    plan_requests, query_rows, expected = [], [], []
    keys_all, values_all = {}, {}
    for r in range(requests):
        length = contexts[r] + sizes[r]
        keys = torch.randn(length, HEADS, DIM, generator=generator).to(dtype)
        values = torch.randn(length, HEADS, DIM, generator=generator).to(dtype)
        positions = torch.arange(length)
        slots = block_table[r, positions // BLOCK].long() * BLOCK + positions % BLOCK
        _write(cache, keys, values, slots)
        keys_all[r], values_all[r] = keys, values
        parents = _random_parents(sizes[r], generator)
        plan_requests.append(TreeRequest(r, contexts[r], ancestor_mask(parents)))
        query_rows.append(torch.randn(sizes[r], QUERY_HEADS, DIM, generator=generator).to(dtype))
    query = torch.cat(query_rows)
    starts = [0]
    for rows in query_rows:
        starts.append(starts[-1] + rows.shape[0])
    output = torch.zeros_like(query)
    plan = TreePlan(tuple(plan_requests))
    tree = prepare_tree(plan, block_table, starts, BLOCK, query.shape[0])
    paged_tree_attention(query, cache, tree, DIM ** -0.5, output)
    for r, request in enumerate(plan_requests):
        visible = torch.cat([torch.ones(sizes[r], contexts[r], dtype=torch.bool), request.mask], 1)
        expected = F.scaled_dot_product_attention(
            query_rows[r].transpose(0, 1).float(), keys_all[r].transpose(0, 1).float(),
            values_all[r].transpose(0, 1).float(), attn_mask=visible, scale=DIM ** -0.5, enable_gqa=True)
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(output[starts[r] : starts[r + 1]].float(), expected.transpose(0, 1),
                                   atol=tolerance, rtol=tolerance)


def test_move_tokens_copies_key_and_value_between_slots():
    generator = torch.Generator().manual_seed(3)
    cache = torch.zeros(3, HEADS, BLOCK, 2 * DIM)
    keys, values = torch.randn(6, HEADS, DIM, generator=generator), torch.randn(6, HEADS, DIM, generator=generator)
    slots = torch.tensor([5, 9, 33, 40, 70, 71])
    _write(cache, keys, values, slots)
    move_tokens(cache, torch.tensor([9, 70, 71]), torch.tensor([6, 7, 8]))
    for source, target in ((1, 6), (4, 7), (5, 8)):
        block, offset = divmod(target, BLOCK)
        torch.testing.assert_close(key_view(cache)[block, :, :, offset], keys[source])
        torch.testing.assert_close(value_view(cache)[block, :, offset, :], values[source])
    block, offset = divmod(5, BLOCK)  # untouched source stays
    torch.testing.assert_close(key_view(cache)[block, :, :, offset], keys[0])
