"""Tree-masked attention over vLLM's paged CPU KV cache (``vec`` layout), batched over
requests: one gather of the used blocks and two einsums per layer, no per-request loop.

Shapes: ``R`` tree requests, ``Q`` their most queries, ``Hq``/``H`` query/KV heads,
``G = Hq / H``, ``D`` head size, ``P`` block size, ``NB`` blocks covering the longest
sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cast.attention.cpu_kv_layout import key_view, value_view
from vllm_cast.attention.tree_plan import TreePlan


def visible_keys(plan: TreePlan, query_counts: list[int], key_count: int) -> torch.Tensor:
    """``[R, Q, NB * P]`` bool: key position ``k`` is visible to query ``i`` of request ``r``
    iff ``k < prefix_r`` or it is a tree key the request's mask allows."""
    requests = plan.requests
    widest = max(r.mask.shape[1] for r in requests)
    masks = torch.zeros(len(requests), max(query_counts), widest, dtype=torch.bool)
    for index, request in enumerate(requests):
        masks[index, : request.mask.shape[0], : request.mask.shape[1]] = request.mask
    prefix = torch.tensor([r.prefix_len for r in requests])
    width = torch.tensor([r.mask.shape[1] for r in requests])
    relative = torch.arange(key_count)[None, :] - prefix[:, None]
    in_tree = (relative >= 0) & (relative < width[:, None])
    tree_part = torch.gather(masks, 2, relative.clamp(0, widest - 1)[:, None, :].expand(-1, masks.shape[1], -1))
    return (relative < 0)[:, None, :] | (tree_part & in_tree[:, None, :])


@dataclass(frozen=True)
class PreparedTree:
    """Per-forward indices shared by all layers. blocks ``[R, NB]`` int64 cache blocks;
    token_rows ``[R, Q]`` int64 query rows (clamped padding); valid ``[R, Q]`` bool;
    visible ``[R, Q, NB * P]`` bool."""

    blocks: torch.Tensor
    token_rows: torch.Tensor
    valid: torch.Tensor
    visible: torch.Tensor


def prepare_tree(plan: TreePlan, block_table: torch.Tensor, query_start_loc: list[int], block_size: int,
                 num_tokens: int) -> PreparedTree:
    """Index the plan's requests for a batch (``block_table`` ``[num_reqs, max_blocks]``,
    ``query_start_loc`` the batch's query offsets, ``num_tokens`` its query rows)."""
    requests = plan.requests
    rows = [r.batch_index for r in requests]
    starts = torch.tensor([query_start_loc[i] for i in rows])
    counts = [query_start_loc[i + 1] - query_start_loc[i] for i in rows]
    longest = max(r.prefix_len + r.mask.shape[1] for r in requests)
    blocks_used = -(-longest // block_size)
    offsets = torch.arange(max(counts))
    return PreparedTree(
        blocks=block_table[rows, :blocks_used].long(),
        token_rows=(starts[:, None] + offsets[None, :]).clamp_max(num_tokens - 1),
        valid=offsets[None, :] < torch.tensor(counts)[:, None],
        visible=visible_keys(plan, counts, blocks_used * block_size),
    )


def paged_tree_attention(query: torch.Tensor, kv_cache: torch.Tensor, tree: PreparedTree, scale: float,
                         output: torch.Tensor) -> None:
    """Write the attention of every tree request's queries into ``output``.

    query/output ``[T, Hq, D]``; kv_cache ``[num_blocks, H, P, 2 * D]``."""
    requests, width = tree.token_rows.shape
    heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    query_heads, head_size = query.shape[1], query.shape[2]
    keys = key_view(kv_cache)[tree.blocks]  # [R, NB, H, D, P]
    values = value_view(kv_cache)[tree.blocks]  # [R, NB, H, P, D]
    q = query[tree.token_rows].view(requests, width, heads, query_heads // heads, head_size).to(keys.dtype)
    scores = torch.einsum("rqhgd,rbhdp->rhgqbp", q, keys).flatten(-2)
    scores = scores.float().mul_(scale).masked_fill_(~tree.visible[:, None, None], float("-inf"))
    probs = scores.softmax(-1).to(values.dtype).unflatten(-1, (tree.blocks.shape[1], block_size))
    attended = torch.einsum("rhgqbp,rbhpd->rqhgd", probs, values).reshape(requests, width, query_heads, head_size)
    output[tree.token_rows[tree.valid]] = attended[tree.valid].to(output.dtype)
