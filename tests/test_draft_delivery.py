"""Drafts delivered with the step's output (vllm_cast.draft_delivery): CAST's engine core
never asks the worker for them in a separate RPC, yet every tree still reaches the
scheduler (vLLM's own EAGLE-3 engine keeping its RPC is checked in test_engine_trees,
where that engine is created: vLLM's metrics follow the engine created last)."""

from __future__ import annotations

from conftest import cast_stats, count_draft_rpcs, greedy_token_ids

from vllm_cast.prompts import TASKS, load_prompts

PROMPTS = [load_prompts(task, limit=1)[0] for task in TASKS]


def test_cast_drafts_reach_the_scheduler_without_the_rpc(cast_llm, vanilla_llm):
    before = cast_stats(cast_llm)
    got: list[list[int]] = []
    calls = count_draft_rpcs(cast_llm, lambda: got.extend(greedy_token_ids(cast_llm, PROMPTS, 24)))
    after = cast_stats(cast_llm)
    assert calls == 0
    assert after["verified_drafts"] > before["verified_drafts"], "no drafted tree was scheduled for verification"
    assert got == greedy_token_ids(vanilla_llm, PROMPTS, 24)
