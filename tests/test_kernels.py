"""Each Triton kernel against its torch reference on fresh random inputs (ragged batches,
trees of 1 to 128 nodes). Without a GPU the kernels run under TRITON_INTERPRET=1 (set by
conftest.py before triton is imported)."""

from __future__ import annotations

import random

import pytest
import torch
from vllm_cast.kernels.tree_attention import tree_attention, tree_attention_reference
from vllm_cast.kernels.tree_mask import tree_meta, tree_meta_reference
from vllm_cast.kernels.tree_topk import tree_topk, tree_topk_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = random.SystemRandom().randrange(2**31)


@pytest.fixture
def generator():
    print(f"kernel test seed {SEED}")  # shown on failure: rerun with this seed to reproduce
    return torch.Generator().manual_seed(SEED)


def random_trees(sizes: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded topological parent arrays ``[B, max(sizes)]`` and their depth bound."""
    n = max(sizes)
    parents = torch.full((len(sizes), n), -1, dtype=torch.int64)
    deepest = 0
    for row, size in enumerate(sizes):
        depth = [0]
        for i in range(1, size):
            # mostly shallow-wide trees, sometimes chains
            p = i - 1 if torch.rand((), generator=generator) < 0.3 else int(torch.randint(0, i, (), generator=generator))
            parents[row, i] = p
            depth.append(depth[p] + 1)
        deepest = max(deepest, max(depth))
    return parents, torch.tensor(sizes), deepest


@pytest.mark.parametrize("sizes", [[1], [128], [1, 5, 37, 128, 2], [64] * 3])
def test_tree_meta_matches_reference(sizes, generator):
    parents, lengths, deepest = random_trees(sizes, generator)
    got = tree_meta(parents.to(DEVICE), lengths.to(DEVICE), deepest)
    want = tree_meta_reference(parents, lengths, deepest)
    for name, a, b in zip(("mask", "depth", "paths", "is_leaf"), got, want):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize(("batch", "width", "vocab", "k", "n_best"),
                         [(1, 1, 7, 1, 1), (3, 4, 1000, 8, 8), (2, 16, 5000, 10, 64), (5, 2, 33, 4, 3)])
def test_tree_topk_matches_reference(batch, width, vocab, k, n_best, generator):
    logits = torch.randn(batch, width, vocab, generator=generator) * 3
    logits[..., :4] = logits[..., 4:5]  # exact ties exercise the tie order
    probs = logits.softmax(-1)
    parent_values = torch.rand(batch, width, generator=generator)
    got = tree_topk(probs.to(DEVICE), parent_values.to(DEVICE), k, n_best)
    want = tree_topk_reference(probs, parent_values, k, n_best)
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1])
    assert torch.equal(got[2].cpu(), want[2])


@pytest.mark.parametrize(("dtype", "head_dim", "heads", "kv_heads", "sizes"), [
    (torch.float16, 64, 8, 2, [1, 7, 128]),
    (torch.bfloat16, 64, 8, 2, [16, 1, 1, 40]),
    (torch.float16, 128, 4, 4, [3]),
    (torch.bfloat16, 128, 4, 4, [1, 7, 128]),
    (torch.bfloat16, 64, 6, 1, [16, 1, 1, 40]),
    (torch.float16, 128, 8, 1, [128, 2]),
])
def test_tree_attention_matches_reference(dtype, head_dim, heads, kv_heads, sizes, generator):
    parents, lengths, deepest = random_trees(sizes, generator)
    mask, _, _, _ = tree_meta_reference(parents, lengths, deepest)
    block_size = 16
    contexts = [int(torch.randint(0, 90, (), generator=generator)) for _ in sizes]
    seq_lens = torch.tensor([c + n for c, n in zip(contexts, sizes)])
    blocks_per_req = int((seq_lens.max() + block_size - 1) // block_size)
    num_blocks = blocks_per_req * len(sizes) + 3
    block_table = torch.randperm(num_blocks, generator=generator)[: blocks_per_req * len(sizes)].view(len(sizes), -1)
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)))
    q = torch.randn(int(qsl[-1]), heads, head_dim, generator=generator).to(dtype)
    scale = head_dim ** -0.5
    args = (key_cache, value_cache, block_table.int(), seq_lens, qsl, mask)
    got = tree_attention(q.to(DEVICE), *(a.to(DEVICE) for a in args), scale)
    want = tree_attention_reference(q, *args, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)


def test_tree_attention_mask_matters(generator):
    """A node must not see its siblings: flipping one mask bit changes that node's output."""
    parents = torch.tensor([[-1, 0, 0]])
    mask, _, _, _ = tree_meta_reference(parents, torch.tensor([3]), 1)
    key_cache = torch.randn(2, 16, 1, 64, generator=generator)
    value_cache = torch.randn(2, 16, 1, 64, generator=generator)
    q = torch.randn(3, 1, 64, generator=generator)
    args = [key_cache.to(DEVICE), value_cache.to(DEVICE), torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE),
            torch.tensor([20], device=DEVICE), torch.tensor([0, 3], device=DEVICE)]
    base = tree_attention(q.to(DEVICE), *args, mask.to(DEVICE), 0.125)
    leaky = mask.clone()
    leaky[0, 2, 1] = 1
    changed = tree_attention(q.to(DEVICE), *args, leaky.to(DEVICE), 0.125)
    assert torch.equal(base[:2], changed[:2]) and not torch.allclose(base[2], changed[2])
