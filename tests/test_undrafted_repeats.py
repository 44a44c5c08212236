"""Steps that repeat a batch of undrafted requests skip CAST's bookkeeping (runner's
``_repeats_undrafted_step``), with one in ``UNDRAFTED_SAMPLE_EVERY`` measured for all."""

from __future__ import annotations

from conftest import count_draft_rpcs, greedy_token_ids, model_runner

from vllm_cast.prompts import load_prompts
from vllm_cast.runner import UNDRAFTED_SAMPLE_EVERY

NEW_TOKENS = 40


def test_an_undrafted_batch_repeats_plain_steps_measured_one_in_a_few(vanilla_llm, default_cast_llm, monkeypatch):
    """With speculation hopeless, a wave of three greedy requests decodes as vanilla does;
    from its second decode step on every step repeats the batch, none asks the worker for
    drafts, and the plain steps counted towards staleness (vllm_cast.throughput) are the
    measured ones times ``UNDRAFTED_SAMPLE_EVERY``: every step but the last few."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda *args, **kwargs: True)
    counted_plain_steps = []
    record = runner.drafter.throughput.record

    def spied_record(batch_size, all_sampled, speculative, tokens, seconds, plain_steps=1):
        if not speculative:
            counted_plain_steps.append(plain_steps)
        return record(batch_size, all_sampled, speculative, tokens, seconds, plain_steps)

    monkeypatch.setattr(runner.drafter.throughput, "record", spied_record)
    repeated = []
    sample_repeat = runner._sample_undrafted_repeat
    monkeypatch.setattr(runner, "_sample_undrafted_repeat", lambda grammar_output: repeated.append(1)
                        or sample_repeat(grammar_output))
    prompts = load_prompts("qa", limit=3)
    cast_ids = []
    rpcs = count_draft_rpcs(default_cast_llm, lambda: cast_ids.extend(greedy_token_ids(default_cast_llm, prompts,
                                                                                       NEW_TOKENS)))
    assert cast_ids == greedy_token_ids(vanilla_llm, prompts, NEW_TOKENS)
    assert rpcs == 0, "drafts are delivered with the output on repeated steps too"
    repeats = len(repeated)
    assert repeats >= NEW_TOKENS - 3, f"{repeats} of {NEW_TOKENS - 1} decode steps repeated the batch"
    measured = sum(1 for steps in counted_plain_steps if steps == UNDRAFTED_SAMPLE_EVERY)
    assert measured == repeats // UNDRAFTED_SAMPLE_EVERY, f"{measured} of {repeats} repeated steps measured"
    assert repeats - UNDRAFTED_SAMPLE_EVERY < sum(counted_plain_steps) <= NEW_TOKENS, (
        f"plain steps counted {sum(counted_plain_steps)} for {repeats} repeated steps")
