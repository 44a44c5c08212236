"""Drafts delivered with the step's output (vllm_cast.draft_delivery): CAST's engine core
never asks the worker for them in a separate RPC, yet every tree still reaches the
scheduler; vLLM's own EAGLE-3 engine keeps its RPC."""

from __future__ import annotations

from conftest import cast_stats, greedy_token_ids

from vllm_cast.prompts import TASKS, load_prompts

PROMPTS = [load_prompts(task, limit=1)[0] for task in TASKS]


def _count_draft_rpcs(llm, run) -> int:
    """Calls of the engine core's ``take_draft_token_ids`` RPC during ``run()``."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    original = executor.take_draft_token_ids
    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return original()

    executor.take_draft_token_ids = counted
    try:
        run()
    finally:
        del executor.take_draft_token_ids  # the class's method again
    return calls


def test_cast_drafts_reach_the_scheduler_without_the_rpc(cast_llm, vanilla_llm):
    before = cast_stats(cast_llm)
    got: list[list[int]] = []
    calls = _count_draft_rpcs(cast_llm, lambda: got.extend(greedy_token_ids(cast_llm, PROMPTS, 24)))
    after = cast_stats(cast_llm)
    assert calls == 0
    assert after["verified_drafts"] > before["verified_drafts"], "no drafted tree was scheduled for verification"
    assert got == greedy_token_ids(vanilla_llm, PROMPTS, 24)


def test_engines_without_cast_keep_vllms_draft_rpc(chain_llm):
    calls = _count_draft_rpcs(chain_llm, lambda: greedy_token_ids(chain_llm, PROMPTS[:2], 8))
    assert calls > 0
