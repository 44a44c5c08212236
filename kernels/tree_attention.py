"""Tree attention for verification over a paged KV cache.

Each request b has ``q_len_b`` tree-node queries (packed along ``T`` by ``query_start_loc``)
whose own keys/values were already written to the cache at positions
``ctx_b .. ctx_b + q_len_b - 1`` (``ctx_b = seq_lens[b] - q_len_b``). Query j of request b
sees every context key and the tree key ``ctx_b + i`` iff ``tree_mask[b, j, i]``.

Shapes: ``q`` ``[T, Hq, D]``; ``key_cache``/``value_cache`` ``[num_blocks, block_size, Hkv, D]``
(vLLM's layout); ``block_table`` ``[B, max_blocks]`` int32; ``seq_lens`` ``[B]``;
``query_start_loc`` ``[B + 1]``; ``tree_mask`` ``[B, N, N]`` int8/bool. Output ``[T, Hq, D]``
in ``q``'s dtype. fp16/bf16/fp32, head dims 64 and 128 (any power of two), GQA (Hq % Hkv == 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2, use_triton


@triton.jit
def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, mask_ptr, scale,
                           max_blocks, N,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """One program: request b, KV head kvh, a tile of BLOCK_M (tree node, q head) rows, so
    the request's context K/V is read once per tile, not once per node."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len * G:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    node_q = rows // G  # tree node of each row
    head = kvh * G + rows % G
    row_ok = node_q < q_len
    d = tl.arange(0, D)
    q_off = ((q_start + node_q).to(tl.int64) * HQ + head)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_seq = pos < seq_len
        block = tl.load(block_table_ptr + b.to(tl.int64) * max_blocks + pos // BLOCK_SIZE, mask=in_seq, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = (slot[:, None] * HKV + kvh) * D + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=in_seq[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=in_seq[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        node_k = pos - ctx
        visible = (in_seq & (node_k < 0))[None, :] & row_ok[:, None]
        if start + BLOCK_N > ctx:  # the tile reaches the tree: apply the ancestor mask
            in_tree = (node_k >= 0) & in_seq
            tree_ok = tl.load(mask_ptr + (b.to(tl.int64) * N + node_q[:, None]) * N + node_k[None, :],
                              mask=row_ok[:, None] & in_tree[None, :], other=0)
            visible = visible | (tree_ok != 0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(visible, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def gather_request_kv(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[seq_len, Hkv, D]`` entries of one request from a paged cache."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    return cache[block_table_row[pos // block_size].long(), pos % block_size]


def tree_attention_reference(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, tree_mask, scale):
    """Torch reference (SDPA in float32 per request) of :func:`tree_attention`."""
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        ctx = seq_len - q_len
        k = gather_request_kv(key_cache, block_table[b], seq_len)
        v = gather_request_kv(value_cache, block_table[b], seq_len)
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device)
        allowed[:, ctx:] = tree_mask[b, :q_len, :q_len].bool()
        attn = torch.nn.functional.scaled_dot_product_attention(
            q[qsl[b] : qsl[b + 1]].transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            attn_mask=allowed, scale=scale, enable_gqa=True)
        out[qsl[b] : qsl[b + 1]] = attn.transpose(0, 1).to(q.dtype)
    return out


def tree_attention(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, tree_mask, scale: float):
    """Attention of tree-node queries over the paged cache (module doc)."""
    if not use_triton(q):
        return tree_attention_reference(q, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                                        tree_mask, scale)
    t, hq, d = q.shape
    hkv = key_cache.shape[2]
    out = torch.empty_like(q)
    if t == 0:
        return out
    n = tree_mask.shape[-1]
    block_m = min(128, max(16, next_power_of_2(n * (hq // hkv))))
    grid = (block_table.shape[0], hkv, triton.cdiv(n * (hq // hkv), block_m))
    _tree_attention_kernel[grid](
        q.contiguous(), key_cache, value_cache, out, block_table.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), query_start_loc.to(torch.int32).contiguous(),
        tree_mask.to(torch.int8).contiguous(), scale, block_table.shape[1], n,
        HQ=hq, HKV=hkv, D=d, BLOCK_SIZE=key_cache.shape[1], BLOCK_M=block_m, BLOCK_N=64,
        UPCAST=not q.is_cuda)  # the CPU interpreter has no bf16 matmul: compute in fp32 there
    return out
