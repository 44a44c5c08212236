"""CAST trees inside real vLLM engines on the trained fixture pair: lossless greedy output
at several batch sizes, wide trees, more tokens per step than the EAGLE-3 chain as deep, and
the target's sampling distribution preserved."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import cast_stats, count_draft_rpcs, greedy_token_ids, make_llm, model_runner, tree_spec
from scipy.stats import chi2_contingency
from vllm import SamplingParams

from benchmarks.decode_steps import DecodeCount, generate_counting_steps
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


def _tokens_per_decode_step(llm, prompts: list[str], batch_size: int) -> float:
    """Greedy tokens a request emits per decode step (bonus included), ``prompts`` submitted
    ``batch_size`` at a time; counted from each step's output, the same way for every engine
    (benchmarks.decode_steps)."""
    count = DecodeCount()
    for start in range(0, len(prompts), batch_size):
        count += generate_counting_steps(llm, prompts[start : start + batch_size], GREEDY)
    return count.tokens_per_step


@pytest.fixture(scope="session")  # an in-process engine's shutdown tears down the others' distributed state
def branching_llm(target_dir: str, draft_dir: str):
    """CAST trees no deeper than the chain below (4 layers), up to 4 children per node, and
    thresholds near 0, so that the node budget and the nodes' values shape them, not the
    cost table. With the shared fixture's thresholds, four fresh tables on this CPU gave
    trees of mean depth 3.2-3.7 and 3.97-4.29 tokens per step against the chain's 3.74, and
    one CI run's table trees that accepted fewer tokens per step than the chain."""
    return make_llm(target_dir, {**tree_spec(draft_dir), "breadth_threshold": 1e-6, "depth_threshold": 0.0,
                                 "verify_threshold": 1e-6, "node_top_k": 4, "max_depth": 4})


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
    timed = after["timed_steps"] - before["timed_steps"]
    assert timed > 0, "no speculative step was timed"
    for price in ("predicted_step_seconds", "priced_step_seconds", "measured_step_seconds"):
        assert after[price] - before[price] > 1e-4 * timed, f"{price} did not grow with the timed steps"


def test_no_tree_drafts_past_a_requests_max_tokens(vanilla_llm, cast_llm, monkeypatch):
    """Real engine, greedy, requests of 5-13 tokens in twos: every drafting call hands back
    at most the draft tokens each request's next step can still emit, a step after which
    every request ends with its next token drafts nothing, and output is vanilla's."""
    runner = model_runner(cast_llm)
    calls: list[tuple[list[int], list[int]]] = []
    propose = runner.propose_draft_token_ids

    def recorded(*args, **kwargs):
        left = runner._tokens_left(runner.input_batch.req_ids[: runner.input_batch.num_reqs])
        budgets = [max(tokens - 1, 0) for tokens in left]  # the next step's bonus token is one of them
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


def test_trees_are_priced_at_the_batch_the_next_step_verifies(vanilla_llm, cast_llm, monkeypatch):
    """Real engine, greedy, requests of 6, 11 and 20 tokens decoding together: every drafting
    call prices its trees at the batch size of the step that verifies them (``next_batch``),
    also where requests end, and output is vanilla's."""
    runner = model_runner(cast_llm)
    drafter = runner.drafter
    step_batches: list[int] = []
    priced: dict[int, int] = {}  # step index -> next_batch set by its drafting call
    execute, propose = runner.execute_model, runner.propose_draft_token_ids

    def counted_step(*args, **kwargs):
        output = execute(*args, **kwargs)
        step_batches.append(runner.input_batch.num_reqs)  # this step's, once its states are updated
        return output

    def recorded_proposal(*args, **kwargs):
        drafter.next_batch = None
        drafts = propose(*args, **kwargs)
        if drafter.next_batch is not None:
            priced[len(step_batches) - 1] = drafter.next_batch
        return drafts

    monkeypatch.setattr(runner, "execute_model", counted_step)
    monkeypatch.setattr(runner, "propose_draft_token_ids", recorded_proposal)
    prompts = PROMPTS[:3]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 11, 20)]
    got, expected = ([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
                     for llm in (cast_llm, vanilla_llm))
    assert got == expected
    checked = [(step, batch) for step, batch in priced.items() if step + 1 < len(step_batches)]
    assert all(batch == step_batches[step + 1] for step, batch in checked), (priced, step_batches)
    assert any(batch < step_batches[step] for step, batch in checked), "no drafting step ended a request"


def test_trees_accept_more_per_step_than_the_eagle3_chain(chain_llm, branching_llm):
    """Trees as deep as the 4-token chain: the siblings they verify catch tokens the
    chain's single path misses."""
    prompts = PROMPTS[:12]
    chain = _tokens_per_decode_step(chain_llm, prompts, 4)
    trees = _tokens_per_decode_step(branching_llm, prompts, 4)
    print(f"tokens per decode step: EAGLE-3 chain (4 tokens) {chain:.2f}, "
          f"CAST trees (<=16 nodes, depth <=4) {trees:.2f}")
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
