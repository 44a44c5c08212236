"""Greedy tree verification against brute force; sampling verification is lossless."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from vllm_cast.tree import FlatTree, path_to, root_to_leaf_paths
from vllm_cast.verify import verify_greedy, verify_sampling


@st.composite
def tree_with_argmax(draw):
    n = draw(st.integers(1, 30))
    vocab = draw(st.integers(2, 5))
    parents = [-1]
    tokens = [draw(st.integers(0, vocab - 1))]
    for _ in range(1, n):
        parent = draw(st.integers(0, len(parents) - 1))
        used = {tokens[j] for j in range(1, len(parents)) if parents[j] == parent}
        free = [t for t in range(vocab) if t not in used]
        if not free:
            continue
        parents.append(parent)
        tokens.append(draw(st.sampled_from(free)))
    argmax = [draw(st.integers(0, vocab - 1)) for _ in parents]
    tree = FlatTree(torch.tensor(tokens), torch.tensor(parents), torch.ones(len(parents)))
    return tree, torch.tensor(argmax)


def brute_force_greedy(tree: FlatTree, argmax: torch.Tensor) -> list[int]:
    """Longest root path whose every token equals the target argmax of its parent."""
    best: list[int] = []
    for row in root_to_leaf_paths(tree.parents):
        path = [int(i) for i in row if i >= 0]
        ok = 0
        for a, b in itertools.pairwise(path):
            if int(tree.tokens[b]) != int(argmax[a]):
                break
            ok += 1
        if ok > len(best):
            best = path[1 : ok + 1]
    return best


@settings(max_examples=300, deadline=None)
@given(tree_with_argmax())
def test_greedy_matches_brute_force(case):
    tree, argmax = case
    verdict = verify_greedy(tree, argmax)
    assert verdict.accepted == brute_force_greedy(tree, argmax)
    last = verdict.accepted[-1] if verdict.accepted else 0
    assert verdict.tokens == [int(tree.tokens[i]) for i in verdict.accepted] + [int(argmax[last])]
    assert path_to(tree.parents, last)[1:] == verdict.accepted


VOCAB = 4


def target_probs(path: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'target model' over 4 tokens whose distribution depends on the path."""
    generator = torch.Generator().manual_seed(hash(path) % (2**31))
    logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64) * 1.5
    return logits.softmax(-1)


def draft_tree(prefix: tuple[int, ...], generator: torch.Generator) -> FlatTree:
    """A small random tree (at most 3 children per node, depth 2) rooted after ``prefix``;
    the draft is deliberately unlike the target."""
    tokens, parents, paths = [prefix[-1] if prefix else 0], [-1], [prefix]
    for depth in range(2):
        for node in [i for i, p in enumerate(paths) if len(p) == len(prefix) + depth]:
            width = int(torch.randint(0, 4, (), generator=generator))
            for token in torch.randperm(VOCAB, generator=generator)[:width].tolist():
                tokens.append(token)
                parents.append(node)
                paths.append(paths[node] + (token,))
    return FlatTree(torch.tensor(tokens), torch.tensor(parents), torch.ones(len(tokens))), paths


def sample_two_tokens(generator: torch.Generator) -> tuple[int, int]:
    """Generate two tokens with tree speculation (a second step when the first emitted one)."""
    out: tuple[int, ...] = ()
    while len(out) < 2:
        tree, paths = draft_tree(out, generator)
        probs = torch.stack([target_probs(p) for p in paths])
        out += tuple(verify_sampling(tree, probs, generator).tokens)
    return out[0], out[1]


def test_sampling_preserves_the_target_distribution():
    """Chi-square of 20,000 two-token samples against the exact joint p(x1) p(x2 | x1).
    The test fails falsely with probability 1e-4 (its significance level)."""
    generator = torch.Generator().manual_seed(7)
    trials = 20_000
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(trials):
        a, b = sample_two_tokens(generator)
        counts[a, b] += 1
    first = target_probs(())
    expected = torch.stack([first[a] * target_probs((a,)) for a in range(VOCAB)]) * trials
    assert chisquare(counts.flatten().numpy(), expected.flatten().numpy()).pvalue > 1e-4


def test_sampling_detects_a_biased_verifier():
    """The statistic has power: accepting children with probability 1 (ignoring p) is caught."""
    generator = torch.Generator().manual_seed(3)
    trials = 5_000
    counts = torch.zeros(VOCAB)
    for _ in range(trials):
        tree, paths = draft_tree((), generator)
        probs = torch.stack([target_probs(p) for p in paths])
        biased = probs.clone()
        for child in range(1, len(tree)):
            if int(tree.parents[child]) == 0:
                biased[0] = torch.nn.functional.one_hot(tree.tokens[child], VOCAB).double()
                break
        counts[verify_sampling(tree, biased, generator).tokens[0]] += 1
    expected = target_probs(()) * trials
    assert chisquare(counts.numpy(), expected.numpy()).pvalue < 1e-4
