"""Draft-tree top-k for one expansion layer of a batch, on the device (no host sync).

Inputs: ``probs`` ``[B, W, V]`` draft probabilities at the W frontier nodes, ``parent_values``
``[B, W]`` their path values. Outputs:
- ``child_tokens`` ``[B, W, K]`` int64 and ``child_values`` ``[B, W, K]`` float32: each node's
  K most likely children (ties: lower token id first), value = parent value x probability;
- ``best`` ``[B, n]`` int64: indices into the flattened ``W*K`` candidates of the layer's n
  largest values (descending; ties: lower index first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2, use_triton


@triton.jit
def _row_topk_kernel(probs_ptr, parent_ptr, tok_ptr, val_ptr, V, K: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    parent_value = tl.load(parent_ptr + row)
    prev_val = float("inf")
    prev_idx = -1
    for k in range(K):
        best_val = -float("inf")
        best_idx = 2147483647
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            vals = tl.load(probs_ptr + row.to(tl.int64) * V + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            # only elements ranked after the previous pick in (value desc, index asc) order
            after = (vals < prev_val) | ((vals == prev_val) & (offs > prev_idx))
            vals = tl.where(after & (offs < V), vals, -float("inf"))
            tile_max = tl.max(vals, axis=0)
            tile_idx = tl.min(tl.where(vals == tile_max, offs, 2147483647), axis=0)
            better = (tile_max > best_val) | ((tile_max == best_val) & (tile_idx < best_idx))
            best_val = tl.where(better, tile_max, best_val)
            best_idx = tl.where(better, tile_idx, best_idx)
        tl.store(tok_ptr + row * K + k, best_idx.to(tl.int64))
        tl.store(val_ptr + row * K + k, best_val * parent_value)
        prev_val = best_val
        prev_idx = best_idx


@triton.jit
def _layer_topn_kernel(val_ptr, out_ptr, C, N_BEST: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    vals = tl.load(val_ptr + b * C + offs, mask=offs < C, other=-float("inf"))
    for n in range(N_BEST):
        top = tl.max(vals, axis=0)
        idx = tl.min(tl.where(vals == top, offs, BLOCK_C), axis=0)
        tl.store(out_ptr + b * N_BEST + n, idx.to(tl.int64))
        vals = tl.where(offs == idx, -float("inf"), vals)


def tree_topk_reference(probs: torch.Tensor, parent_values: torch.Tensor, k: int, n_best: int):
    """Torch reference of :func:`tree_topk`."""
    b, w, v = probs.shape
    # stable descending sort = ties broken by lower index
    sorted_probs, order = probs.float().sort(dim=-1, descending=True, stable=True)
    child_tokens = order[..., :k].contiguous()
    child_values = sorted_probs[..., :k] * parent_values.float()[..., None]
    best = child_values.reshape(b, w * k).sort(dim=-1, descending=True, stable=True).indices[:, :n_best]
    return child_tokens, child_values, best.contiguous()


def tree_topk(probs: torch.Tensor, parent_values: torch.Tensor, k: int, n_best: int):
    """Per-node top-k children and the layer's global top-n (module doc)."""
    b, w, v = probs.shape
    if n_best > w * k:
        raise ValueError(f"n_best={n_best} exceeds the layer's {w * k} candidates")
    if not use_triton(probs):
        return tree_topk_reference(probs, parent_values, k, n_best)
    device = probs.device
    child_tokens = torch.empty(b, w, k, dtype=torch.int64, device=device)
    child_values = torch.empty(b, w, k, dtype=torch.float32, device=device)
    best = torch.empty(b, n_best, dtype=torch.int64, device=device)
    if b * w:
        _row_topk_kernel[(b * w,)](probs.contiguous(), parent_values.float().contiguous(), child_tokens, child_values,
                                   v, K=k, BLOCK_V=min(4096, next_power_of_2(v)))
        _layer_topn_kernel[(b,)](child_values, best, w * k, N_BEST=n_best, BLOCK_C=next_power_of_2(w * k))
    return child_tokens, child_values, best
