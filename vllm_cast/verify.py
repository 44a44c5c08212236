"""Tree verification: which draft nodes the target accepts, and the token it adds.

Inputs for one request: a :class:`~vllm_cast.tree.FlatTree` and the target's output at
every tree node (row i = the target's distribution for the token after node i's path).

Greedy: follow the child whose token equals the target argmax while one exists; the
target's argmax at the last accepted node is the bonus token.

Sampling (lossless, for deterministic multi-candidate drafts, i.e. q = one-hot): at the
current node, try its children in order; child x is accepted with probability p(x) under
the current residual p; on rejection p(x) is set to 0 and p renormalised. If no child is
accepted (or the node is a leaf) the emitted token is sampled from the residual. The
emitted sequence is distributed exactly as autoregressive sampling from the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cast.tree import FlatTree


@dataclass
class Verdict:
    """accepted: node indices of the accepted path below the root, in order;
    tokens: the emitted tokens (accepted draft tokens then the bonus/correction token)."""

    accepted: list[int]
    tokens: list[int]


def children_lists(parents: list[int]) -> list[list[int]]:
    """Children of every node in node order."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(node)
    return children


def verify_greedy(tree: FlatTree, target_argmax: torch.Tensor) -> Verdict:
    """target_argmax ``[N]``: the target's token after each node (its argmax; or, for
    sampling by drawing at every node, its draw there). Accept while a child matches."""
    return walk_matches(tree.tokens.tolist(), tree.parents.tolist(), target_argmax.tolist())


def walk_matches(tokens: list[int], parents: list[int], drawn: list[int]) -> Verdict:
    """:func:`verify_greedy` on plain lists (``N`` node tokens, parents and the target's
    token after each node): the verification loop's per-request walk, without tensors."""
    children = children_lists(parents)
    node, accepted = 0, []
    while True:
        nxt = next((c for c in children[node] if tokens[c] == drawn[node]), None)
        if nxt is None:
            break
        accepted.append(nxt)
        node = nxt
    return Verdict(accepted, [tokens[i] for i in accepted] + [drawn[node]])


def verify_sampling(tree: FlatTree, target_probs: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
    """target_probs ``[N, V]``: the target's (processed) sampling distribution after each
    node. Recursive rejection over siblings with a residual sample (module doc)."""
    children = children_lists(tree.parents.tolist())
    tokens = tree.tokens.tolist()
    node, accepted = 0, []
    while True:
        residual = target_probs[node].double().clone()
        nxt = None
        for child in children[node]:
            token = tokens[child]
            total = float(residual.sum())
            p = float(residual[token]) / total if total > 0 else 0.0
            if torch.rand((), generator=generator, dtype=torch.float64).item() < p:
                nxt = child
                break
            residual[token] = 0.0
        if nxt is None:
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            return Verdict(accepted, [tokens[i] for i in accepted] + [token])
        accepted.append(nxt)
        node = nxt
