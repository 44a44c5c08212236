"""Tree metadata in one launch: ancestor masks, depth positions and root paths.

Input: ``parents`` ``[B, N]`` int32/int64 of topologically ordered trees (root parent -1,
entries past ``lengths[b]`` ignored). Output:
- ``mask`` ``[B, N, N]`` int8: 1 where column j is node i itself or one of its ancestors
  (the tree attention mask; 0 outside the tree);
- ``depth`` ``[B, N]`` int32: node depth (root 0; RoPE position = context + depth), -1 past length;
- ``paths`` ``[B, N, max_depth + 1]`` int32: the root-to-node path of every node, -1 padded
  (rows of leaves, ``is_leaf``, are the retrieve paths);
- ``is_leaf`` ``[B, N]`` int8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2, use_triton


@triton.jit
def _tree_meta_kernel(parents_ptr, lengths_ptr, mask_ptr, depth_ptr, paths_ptr, leaf_ptr,
                      N: tl.constexpr, N_POW2: tl.constexpr, MAX_DEPTH: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    length = tl.load(lengths_ptr + b)
    cols = tl.arange(0, N_POW2)
    row = tl.zeros([N_POW2], dtype=tl.int8)
    inside = i < length
    # walk from i to the root; `node` is -1 once past the root
    node = tl.where(inside, i, -1)
    depth = -1
    for _ in range(N):
        live = node >= 0
        row = tl.where((cols == node) & live, 1, row)
        depth += tl.where(live, 1, 0)
        parent = tl.load(parents_ptr + b * N + tl.maximum(node, 0))
        node = tl.where(live, parent, -1)
    tl.store(mask_ptr + (b * N + i) * N + cols, row, mask=cols < N)
    tl.store(depth_ptr + b * N + i, tl.where(inside, depth, -1))
    # paths: walk again, writing ancestors from the deepest slot upwards
    slots = tl.arange(0, MAX_DEPTH + 1)
    path = tl.full([MAX_DEPTH + 1], -1, dtype=tl.int32)
    node = tl.where(inside, i, -1)
    level = depth
    for _ in range(N):
        live = node >= 0
        path = tl.where((slots == level) & live, node, path)
        level -= 1
        parent = tl.load(parents_ptr + b * N + tl.maximum(node, 0))
        node = tl.where(live, parent, -1)
    tl.store(paths_ptr + (b * N + i) * (MAX_DEPTH + 1) + slots, path)
    all_parents = tl.load(parents_ptr + b * N + cols, mask=(cols < length) & (cols > 0), other=-1)
    has_child = tl.max(tl.where(all_parents == i, 1, 0), axis=0)
    tl.store(leaf_ptr + b * N + i, tl.where(inside & (has_child == 0), 1, 0).to(tl.int8))


def tree_meta_reference(parents: torch.Tensor, lengths: torch.Tensor, max_depth: int):
    """Torch reference of :func:`tree_meta` (same outputs)."""
    b, n = parents.shape
    mask = torch.zeros(b, n, n, dtype=torch.int8, device=parents.device)
    depth = torch.full((b, n), -1, dtype=torch.int32, device=parents.device)
    paths = torch.full((b, n, max_depth + 1), -1, dtype=torch.int32, device=parents.device)
    is_leaf = torch.zeros(b, n, dtype=torch.int8, device=parents.device)
    cpu_parents = parents.cpu().tolist()
    for row, length in enumerate(lengths.cpu().tolist()):
        par = cpu_parents[row][:length]
        children = {p for p in par[1:]}
        for i in range(length):
            chain, node = [], i
            while node >= 0:
                chain.append(node)
                node = par[node]
            chain.reverse()
            mask[row, i, chain] = 1
            depth[row, i] = len(chain) - 1
            paths[row, i, : len(chain)] = torch.tensor(chain, dtype=torch.int32)
            is_leaf[row, i] = int(i not in children)
    return mask, depth, paths, is_leaf


def tree_meta(parents: torch.Tensor, lengths: torch.Tensor, max_depth: int):
    """Ancestor masks, depths, root paths and leaf flags of a batch of trees (module doc).

    ``max_depth`` bounds the deepest node (tree depth below the root)."""
    if not use_triton(parents):
        return tree_meta_reference(parents, lengths, max_depth)
    b, n = parents.shape
    device = parents.device
    mask = torch.empty(b, n, n, dtype=torch.int8, device=device)
    depth = torch.empty(b, n, dtype=torch.int32, device=device)
    path_slots = next_power_of_2(max_depth + 1)  # tl.arange needs a power of two
    paths = torch.empty(b, n, path_slots, dtype=torch.int32, device=device)
    is_leaf = torch.empty(b, n, dtype=torch.int8, device=device)
    if b and n:
        _tree_meta_kernel[(b, n)](parents.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous(), mask,
                                  depth, paths, is_leaf, N=n, N_POW2=next_power_of_2(n), MAX_DEPTH=path_slots - 1)
    return mask, depth, paths[..., : max_depth + 1].contiguous(), is_leaf
