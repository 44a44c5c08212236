"""CAST trees inside real vLLM engines on the trained fixture pair: lossless greedy output
at several batch sizes, wide trees, longer accepted runs than the EAGLE-3 chain, and the
target's sampling distribution preserved."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import cast_stats, count_draft_rpcs, greedy_token_ids, model_runner, spec_counters
from scipy.stats import chi2_contingency
from vllm import SamplingParams

from vllm_cast.prompts import TASKS, load_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
PROMPTS = [p for rank in range(3) for p in (load_prompts(task, limit=3)[rank] for task in TASKS)]
"""18 prompts, the six task sets interleaved."""


def _generate(llm, prompts: list[str], params: SamplingParams, batch_size: int) -> list[list[int]]:
    """Token ids per prompt, submitted ``batch_size`` prompts at a time."""
    out = []
    for start in range(0, len(prompts), batch_size):
        outputs = llm.generate(prompts[start : start + batch_size], params, use_tqdm=False)
        out += [list(o.outputs[0].token_ids) for o in outputs]
    return out


def _chain_mean_accepted_length(llm, run) -> float:
    """vLLM's mean accepted length per drafting step (bonus token included) over ``run()``
    (valid for the engine created last in this process: vLLM's Prometheus metrics are
    process-global and re-registered by each new engine)."""
    before = spec_counters(llm)
    run()
    after = spec_counters(llm)
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
    accepted = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    assert drafts > 0, "no drafting step"
    return 1 + accepted / drafts


def _cast_mean_accepted_length(llm, run) -> float:
    """The same quantity from CAST's own counters (same definition as vLLM's)."""
    before = cast_stats(llm)
    run()
    after = cast_stats(llm)
    drafts = after["verified_drafts"] - before["verified_drafts"]
    assert drafts > 0, "no drafting step"
    return 1 + (after["accepted_tokens"] - before["accepted_tokens"]) / drafts


@pytest.mark.parametrize("batch_size,count", [(1, 6), (4, 12), (16, 18)])
def test_tree_greedy_equals_vanilla(vanilla_llm, cast_llm, batch_size, count):
    prompts = PROMPTS[:count]
    expected = _generate(vanilla_llm, prompts, GREEDY, batch_size)
    before = cast_stats(cast_llm)
    got = _generate(cast_llm, prompts, GREEDY, batch_size)
    mismatches = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {count} prompts differ, first: {prompts[mismatches[0]][:60]!r}"
    after = cast_stats(cast_llm)
    assert after["speculating_steps"] > before["speculating_steps"], "CAST drafted no tree"
    assert after["max_width"] > 1, "no tree layer wider than one node"
    assert after["max_depth"] > 1, "no tree deeper than one layer"


def test_no_tree_drafts_past_a_requests_max_tokens(vanilla_llm, cast_llm, monkeypatch):
    """Real engine, greedy, requests of 5-13 tokens in twos: every drafting call hands back
    at most the draft tokens each request's next step can still emit, a step after which
    every request ends with its next token drafts nothing, and output is vanilla's."""
    runner = model_runner(cast_llm)
    calls: list[tuple[list[int], list[int]]] = []
    propose = runner.propose_draft_token_ids

    def recorded(*args, **kwargs):
        budgets = runner._draft_budgets(runner.input_batch.req_ids[: runner.input_batch.num_reqs])
        drafts = propose(*args, **kwargs)
        calls.append((budgets, [len(tokens) for tokens in drafts]))
        return drafts

    monkeypatch.setattr(runner, "propose_draft_token_ids", recorded)
    prompts = PROMPTS[:2]
    for max_tokens in (5, 9, 13):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        assert _generate(cast_llm, prompts, params, 2) == _generate(vanilla_llm, prompts, params, 2), max_tokens
    assert all(count <= budget for budgets, counts in calls for budget, count in zip(budgets, counts)), calls
    assert any(0 < max(counts) < runner.drafter.cast_params.max_depth for _, counts in calls), "no tree was cut short"
    assert any(not any(budgets) and not any(counts) for budgets, counts in calls), "no finishing step"


def test_trees_accept_more_per_step_than_the_eagle3_chain(chain_llm, cast_llm):
    prompts = PROMPTS[:12]
    chain = _chain_mean_accepted_length(chain_llm, lambda: _generate(chain_llm, prompts, GREEDY, 4))
    trees = _cast_mean_accepted_length(cast_llm, lambda: _generate(cast_llm, prompts, GREEDY, 4))
    print(f"mean accepted length: EAGLE-3 chain (4 tokens) {chain:.2f}, CAST trees (<=16 nodes) {trees:.2f}")
    assert trees > chain


def test_engines_without_cast_keep_vllms_draft_rpc(chain_llm):
    """vllm_cast.draft_delivery patches vLLM's engine core for every engine in the process:
    one whose outputs carry no drafts still asks for them after each step."""
    calls = count_draft_rpcs(chain_llm, lambda: greedy_token_ids(chain_llm, PROMPTS[:2], 8))
    assert calls > 0


SAMPLES = 1200
SIGNIFICANCE = 1e-3
"""Chi-square false-failure rate: the test fails wrongly once in a thousand runs."""


def _first_two_tokens(llm, prompt: str) -> Counter:
    # No per-request seeds: vLLM 0.32's CPU runner cannot rewind a seeded generator when a
    # chunked prefill discards its sample ("CPU Generator does not use offset"). Six tokens,
    # not two: CAST drafts no more than a request can still emit, so the first decode step's
    # tree holds up to four nodes (with two tokens it would hold none).
    outputs = llm.generate([prompt] * SAMPLES, SamplingParams(temperature=0.6, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)
    return Counter(tuple(o.outputs[0].token_ids[:2]) for o in outputs)


def test_tree_sampling_preserves_the_target_distribution(vanilla_llm, cast_llm):
    """Two-sample chi-square on the joint (first, second) token: vanilla sampling against
    CAST, whose second token is often accepted from a verified tree."""
    prompt = load_prompts("humaneval", limit=1)[0]
    before = cast_stats(cast_llm)["accepted_tokens"]
    cast = _first_two_tokens(cast_llm, prompt)
    accepted = cast_stats(cast_llm)["accepted_tokens"] - before
    assert accepted > SAMPLES // 20, f"trees accepted only {accepted} tokens: the test would not exercise them"
    vanilla = _first_two_tokens(vanilla_llm, prompt)
    common = [k for k in set(cast) | set(vanilla) if cast[k] + vanilla[k] >= 10]
    rows = [[vanilla[k] for k in common], [cast[k] for k in common]]
    rows[0].append(SAMPLES - sum(rows[0]))
    rows[1].append(SAMPLES - sum(rows[1]))
    p_value = chi2_contingency(rows).pvalue
    print(f"{len(common)} pairs, chi-square p = {p_value:.3g}, accepted draft tokens {accepted}")
    assert p_value > SIGNIFICANCE
