"""Reading and moving tokens in vLLM's CPU KV cache with the ``vec`` ISA layout.

A layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; per block and
head the first half holds K transposed (``[head_size, block_size]``) and the second half V
(``[block_size, head_size]``). CAST forces the ``vec`` layout (the AMX one is prepacked and
not addressable token by token)."""

from __future__ import annotations

import torch


def key_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """K of every token as ``[num_blocks, num_kv_heads, head_size, block_size]`` (a view)."""
    blocks, heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(blocks, heads, 2, block_size * two_d // 2)[:, :, 0].view(blocks, heads, two_d // 2, block_size)


def value_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """V of every token as ``[num_blocks, num_kv_heads, block_size, head_size]`` (a view)."""
    blocks, heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(blocks, heads, 2, block_size * two_d // 2)[:, :, 1].view(blocks, heads, block_size, two_d // 2)


def move_tokens(kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy the K/V of cache slots ``src_slots`` ``[T]`` onto ``dst_slots`` ``[T]`` (all
    sources are read before any destination is written)."""
    block_size = kv_cache.shape[2]
    src_block, src_offset = src_slots // block_size, src_slots % block_size
    dst_block, dst_offset = dst_slots // block_size, dst_slots % block_size
    keys, values = key_view(kv_cache), value_view(kv_cache)
    moved_keys = keys[src_block, :, :, src_offset].clone()
    moved_values = values[src_block, :, src_offset, :].clone()
    keys[dst_block, :, :, dst_offset] = moved_keys
    values[dst_block, :, dst_offset, :] = moved_values
