"""Measured throughput veto (vllm_cast.throughput): speculation is judged on wall time."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import greedy_token_ids, model_runner

from vllm_cast.config import CastParams
from vllm_cast.prompts import load_prompts
from vllm_cast.proposer import CastProposer
from vllm_cast.runner import CastRunnerMixin
from vllm_cast.throughput import (MIN_STEPS, REQUEST_STEPS, STALE_AFTER_PLAIN_STEPS, WINDOW_ENTRIES, MeasuredThroughput,
                                  SlowestRequest)
from vllm_cast.tree_builder import StepDecision


def _record(throughput: MeasuredThroughput, batch: int, speculative: bool, tokens: int, seconds: float,
            steps: int = MIN_STEPS, sampled: bool = False) -> None:
    for _ in range(steps):
        throughput.record(batch, sampled, speculative, tokens, seconds)


def test_speculation_measured_slower_than_plain_decoding_is_declined():
    throughput = MeasuredThroughput()
    _record(throughput, 16, speculative=False, tokens=16, seconds=0.008)  # 2000 tokens/s
    assert not throughput.should_decline(16, False), "no speculative steps measured yet"
    _record(throughput, 16, speculative=True, tokens=30, seconds=0.020, steps=MIN_STEPS - 1)  # 1500 tokens/s
    assert not throughput.should_decline(16, False), "too few speculative steps"
    _record(throughput, 16, speculative=True, tokens=30, seconds=0.020, steps=1)
    assert throughput.should_decline(16, False)
    assert not throughput.should_decline(2, False), "other batch sizes are judged on their own"
    assert not throughput.should_decline(16, True), "sampled verification is judged on its own"


def test_faster_speculation_is_kept_and_recent_steps_decide():
    throughput = MeasuredThroughput()
    _record(throughput, 1, speculative=True, tokens=3, seconds=0.008)  # 375 tokens/s
    assert throughput.should_decline(1, False), "plain decoding unmeasured here: explore it"
    _record(throughput, 1, speculative=False, tokens=1, seconds=0.004)  # 250 tokens/s
    assert not throughput.should_decline(1, False)
    _record(throughput, 1, speculative=True, tokens=1, seconds=0.008, steps=WINDOW_ENTRIES)  # 125 tokens/s
    assert throughput.should_decline(1, False)
    assert abs(throughput.summary()["spec_tps_b0"] - 125.0) < 1e-6, "only the recent window counts"


def test_a_speculative_step_counts_its_slowest_request_s_pace():
    slowest = SlowestRequest()
    assert slowest.lockstep_tokens(["a"], [5]) == 5.0, "one request: its own tokens"
    assert slowest.lockstep_tokens(["a", "b"], [7, 1]) == 2 * 1.0, "b emitted one token"
    assert slowest.lockstep_tokens(["a", "b"], [5, 5]) == 2 * 3.0, "b's mean over its two steps"
    for _ in range(REQUEST_STEPS):
        tokens = slowest.lockstep_tokens(["a", "b"], [7, 4])
    assert tokens == 2 * 4.0, f"only b's last {REQUEST_STEPS} steps count"
    assert slowest.lockstep_tokens(["b", "c"], [4, 7]) == 2 * 4.0, "c is new: its one step counts"
    assert set(slowest.windows) == {"b", "c"}, "a left the batch: forgotten"


def test_an_engine_counts_a_batch_s_speculative_steps_at_its_slowest_request(cast_llm, monkeypatch):
    """Real engine, greedy, one qa and one MT-Bench request decoding together: each
    speculative step of both is counted as 2 x the lower of their mean tokens over their
    last REQUEST_STEPS speculative steps, which falls below the tokens the step emitted
    when the two requests' drafts run to different depths."""
    runner = model_runner(cast_llm)
    throughput = runner.drafter.throughput
    steps: list[tuple[float, list[int]]] = []  # (counted tokens, each request's emitted tokens)
    record = throughput.record

    def recorded(batch, all_sampled, speculative, tokens, seconds):
        if speculative and batch == 2 and runner._verdicts is not None:
            steps.append((tokens, [len(emitted) for emitted in runner._verdicts.tokens]))
        return record(batch, all_sampled, speculative, tokens, seconds)

    monkeypatch.setattr(throughput, "record", recorded)
    greedy_token_ids(cast_llm, load_prompts("qa", limit=1) + load_prompts("mt_bench", limit=1), 32)
    assert steps, "no speculative step of the two requests together was measured"
    history: list[list[int]] = [[], []]
    for counted, emitted in steps:
        for window, tokens in zip(history, emitted):
            window[:] = (window + [tokens])[-REQUEST_STEPS:]
        assert counted == 2 * min(sum(window) / len(window) for window in history), (counted, emitted, history)
    assert any(counted < sum(emitted) for counted, emitted in steps), f"never below the emitted sum: {steps}"


def test_drafting_new_prompts_is_charged_to_speculation():
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=8, seconds=0.010)  # 800 tokens/s per decode step
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.006)  # 667 tokens/s
    assert not throughput.measured_slower(4, False)
    throughput.record_prompt_drafting(4, False, seconds=0.010 * MIN_STEPS)  # the draft's pass over new prompts
    assert throughput.measured_slower(4, False), "8 tokens per 20 ms: 400 tokens/s"
    throughput.record_prompt_drafting(4, False, seconds=0.001, accepted_drafts=8 * MIN_STEPS)  # decoding rows' gains
    assert not throughput.measured_slower(4, False), "16 tokens per ~20 ms: ~800 tokens/s"


def test_measured_slower_speculation_holds_until_its_samples_are_stale():
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.010)  # 600 tokens/s
    assert not throughput.measured_slower(4, False), "plain decoding not measured yet"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005)  # 800 tokens/s
    assert throughput.measured_slower(4, False)
    assert not throughput.measured_slower(4, True), "sampled verification is judged on its own"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS - MIN_STEPS - 1)
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=1)
    assert not throughput.measured_slower(4, False), "speculative samples this old are dropped"
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.010, steps=MIN_STEPS - 1)
    assert not throughput.measured_slower(4, False), "speculation is measured afresh"
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.010, steps=1)
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS)
    assert throughput.measured_slower(4, False), "confirmed slower once more: the next wait is twice as long"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS)
    assert not throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=True, tokens=12, seconds=0.010)  # 1200 tokens/s: pays now
    assert not throughput.measured_slower(4, False)
    assert throughput.stale_after.get((2, False), STALE_AFTER_PLAIN_STEPS) == STALE_AFTER_PLAIN_STEPS


def test_a_verdict_is_not_rejudged_by_plain_steps_that_follow_it():
    """Plain steps measured later (another task, a slower machine state) do not flip a slower
    verdict into exploring again; the next speculative sample forms it afresh."""
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=18, seconds=0.032)  # 562 tokens/s
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005)  # 800 tokens/s
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.008, steps=WINDOW_ENTRIES)  # 500 tokens/s
    assert throughput.measured_slower(4, False), "held against the plain steps of its time"
    assert throughput.should_decline(4, False)
    throughput.record(4, False, True, 18, 0.032)
    assert not throughput.measured_slower(4, False), "a new speculative sample is judged against plain now"


def test_a_slower_verdict_at_a_smaller_batch_size_rules_out_larger_ones_until_stale():
    throughput = MeasuredThroughput()
    _record(throughput, 2, speculative=True, tokens=3, seconds=0.010)  # 300 tokens/s
    _record(throughput, 2, speculative=False, tokens=2, seconds=0.005)  # 400 tokens/s
    assert throughput.measured_slower(2, False)
    assert throughput.measured_slower(16, False), "larger batches inherit the slower verdict"
    assert not throughput.measured_slower(1, False), "smaller batches do not"
    assert not throughput.measured_slower(16, True), "nor the other verification mode"
    _record(throughput, 16, speculative=True, tokens=40, seconds=0.010)  # 4000 tokens/s
    _record(throughput, 16, speculative=False, tokens=16, seconds=0.008)  # 2000 tokens/s
    assert not throughput.measured_slower(16, False), "a bucket's own verdict comes first"
    assert throughput.measured_slower(8, False), "buckets in between still inherit"
    _record(throughput, 8, speculative=False, tokens=8, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS)
    assert not throughput.measured_slower(8, False), "stale at 8: the inherited evidence is dropped too"
    assert not throughput.measured_slower(2, False)


def test_a_faster_verdict_at_a_smaller_batch_size_is_not_inherited():
    throughput = MeasuredThroughput()
    _record(throughput, 1, speculative=True, tokens=3, seconds=0.006)  # 500 tokens/s
    _record(throughput, 1, speculative=False, tokens=1, seconds=0.004)  # 250 tokens/s
    _record(throughput, 4, speculative=True, tokens=8, seconds=0.010, steps=MIN_STEPS + 2)  # 800 tokens/s
    assert not throughput.measured_slower(4, False), "unknown at 4: explore"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.004)  # 1000 tokens/s
    assert throughput.measured_slower(4, False)


def test_a_decode_step_is_no_sample_the_first_time_it_runs_a_shape():
    """Kernels are set up per token count on first use; such a step must not be measured."""
    runner = SimpleNamespace(_step_tokens=5, _seen_forward_shapes=set())
    first_run = CastRunnerMixin._first_run_of_a_shape
    drafted = StepDecision(draft_forward_tokens=[5, 1, 1])
    assert first_run(runner, drafted), "nothing had run yet"
    assert not first_run(runner, drafted), "same target and draft shapes again"
    assert first_run(runner, StepDecision(draft_forward_tokens=[5, 3])), "a draft layer of 3 rows is new"
    runner._step_tokens = 1
    assert first_run(runner, None), "a plain step of 1 token is a new target shape"
    assert not first_run(runner, None)


def test_a_measured_slower_verdict_is_not_hidden_by_a_memoised_price():
    """The proposer memoises its priced verdict per (batch, context bucket, mode); a later
    measurement that speculating is slower must still make speculation hopeless there."""
    throughput = MeasuredThroughput()
    proposer = SimpleNamespace(cost_source=object(), cast_params=CastParams(), throughput=throughput,
                               _hopeless_calls=0, _hopeless_memo={}, _no_chain_can_pay=lambda *args: False,
                               _solo_slower=lambda all_sampled: None, awaits_solo_probe=lambda all_sampled: False)
    assert not CastProposer.speculation_hopeless(proposer, 16, 300.0, False), "priced: a chain can pay"
    _record(throughput, 16, speculative=True, tokens=20, seconds=0.020)  # 1000 tokens/s
    _record(throughput, 16, speculative=False, tokens=16, seconds=0.008)  # 2000 tokens/s
    assert CastProposer.speculation_hopeless(proposer, 16, 300.0, False)
