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
def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, token_req_ptr,
                           mask_ptr, scale, max_blocks, N,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    G: tl.constexpr = HQ // HKV
    b = tl.load(token_req_ptr + t)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len
    j = t - q_start

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(q_ptr + (t.to(tl.int64) * HQ + heads[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
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
        node = pos - ctx
        in_tree = (node >= 0) & in_seq
        tree_ok = tl.load(mask_ptr + (b.to(tl.int64) * N + j) * N + node, mask=in_tree, other=0)
        visible = (in_seq & (node < 0)) | (in_tree & (tree_ok != 0))
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(visible[None, :], scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (t.to(tl.int64) * HQ + heads[:, None]) * D + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=g[:, None] < G)


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
    counts = query_start_loc[1:] - query_start_loc[:-1]
    token_req = torch.repeat_interleave(torch.arange(counts.numel(), device=q.device, dtype=torch.int32),
                                        counts.long(), output_size=t)
    block_g = max(16, next_power_of_2(hq // hkv))
    _tree_attention_kernel[(t, hkv)](
        q.contiguous(), key_cache, value_cache, out, block_table.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), query_start_loc.to(torch.int32).contiguous(), token_req,
        tree_mask.to(torch.int8).contiguous(), scale, block_table.shape[1], tree_mask.shape[-1],
        HQ=hq, HKV=hkv, D=d, BLOCK_SIZE=key_cache.shape[1], BLOCK_G=block_g, BLOCK_N=64,
        UPCAST=not q.is_cuda)  # the CPU interpreter has no bf16 matmul: compute in fp32 there
    return out
