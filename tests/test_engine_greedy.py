"""Greedy output with method "cast" equals vanilla greedy output, token for token."""

from __future__ import annotations

from conftest import greedy_token_ids, spec_counters

from vllm_cast.prompts import TASKS, load_prompts

PROMPTS = [p for task in TASKS for p in load_prompts(task, limit=3)]


def test_cast_greedy_equals_vanilla(vanilla_llm, cast_llm):
    before = spec_counters(cast_llm)
    vanilla = greedy_token_ids(vanilla_llm, PROMPTS, max_tokens=48)
    cast = greedy_token_ids(cast_llm, PROMPTS, max_tokens=48)
    mismatches = [i for i, (a, b) in enumerate(zip(vanilla, cast)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(PROMPTS)} prompts differ, first: {PROMPTS[mismatches[0]][:60]!r}"
    after = spec_counters(cast_llm)
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
    accepted = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    assert drafts > 0, "CAST never drafted"
    assert accepted > 0, "the trained EAGLE-3 head never had a token accepted"
