"""Measured throughput veto (vllm_cast.throughput): speculation is judged on wall time."""

from __future__ import annotations

import math
from types import MethodType, SimpleNamespace

from conftest import greedy_token_ids, model_runner

from vllm_cast.cohorts import COHORT_WINDOW
from vllm_cast.config import CastParams
from vllm_cast.prompts import load_prompts
from vllm_cast.proposer import CastProposer
from vllm_cast.runner import CastRunnerMixin
from vllm_cast.step_overheads import MIN_SAMPLES, StepOverheads
from vllm_cast.throughput import (CLEARLY_SLOWER, COHORTS_TO_JUDGE, DECIDING_MEMBERS, MIN_STEPS, REEXAMINATION_LOSS,
                                  STALE_AFTER_PLAIN_STEPS, STRONGLY_SLOWER, WINDOW_ENTRIES, MeasuredThroughput)
from vllm_cast.tree_builder import StepDecision


def _record(throughput: MeasuredThroughput, batch: int, speculative: bool, tokens: int, seconds: float,
            steps: int = MIN_STEPS, sampled: bool = False) -> None:
    for _ in range(steps):
        throughput.record(batch, sampled, speculative, tokens, seconds)


def _hopeless_judge(throughput: MeasuredThroughput, no_chain_can_pay, overheads: StepOverheads | None = None):
    """What ``CastProposer.speculation_hopeless`` reads, with its priced half
    (``_no_chain_can_pay(batch_size, context, all_sampled, best_rate)``) given."""
    judge = SimpleNamespace(cost_source=object(), cast_params=CastParams(), throughput=throughput,
                            overheads=overheads or StepOverheads(), _hopeless_calls=0, _hopeless_memo={},
                            _no_chain_can_pay=no_chain_can_pay, _solo_slower=lambda: None,
                            awaits_solo_probe=lambda all_sampled: False)
    judge._priced_hopeless = MethodType(CastProposer._priced_hopeless, judge)
    return judge


def test_speculation_measured_slower_than_plain_decoding_is_declined():
    throughput = MeasuredThroughput()
    _record(throughput, 16, speculative=False, tokens=16, seconds=0.008)  # 2000 tokens/s
    assert not throughput.should_decline(16, False), "no speculative steps measured yet"
    _record(throughput, 16, speculative=True, tokens=30, seconds=0.040, steps=MIN_STEPS - 1)  # 750 tokens/s
    assert not throughput.should_decline(16, False), "too few speculative steps"
    _record(throughput, 16, speculative=True, tokens=30, seconds=0.040, steps=1)
    assert throughput.should_decline(16, False)
    assert not throughput.should_decline(2, False), "other batch sizes are judged on their own"
    assert not throughput.should_decline(16, True), "sampled verification is judged on its own"


def test_faster_speculation_is_kept_and_recent_steps_decide():
    throughput = MeasuredThroughput()
    _record(throughput, 1, speculative=True, tokens=3, seconds=0.008)  # 375 tokens/s
    assert throughput.should_decline(1, False), "plain decoding unmeasured here: explore it"
    _record(throughput, 1, speculative=False, tokens=1, seconds=0.004)  # 250 tokens/s
    assert not throughput.should_decline(1, False)
    _record(throughput, 1, speculative=True, tokens=1, seconds=0.010, steps=WINDOW_ENTRIES)  # 100 tokens/s
    assert throughput.should_decline(1, False)
    assert abs(throughput.summary()["spec_tps_b0"] - 100.0) < 1e-6, "only the recent window counts"


def test_before_its_cohorts_finish_a_bucket_calls_speculation_slower_only_when_far_slower():
    throughput = MeasuredThroughput()
    _record(throughput, 2, speculative=False, tokens=2, seconds=0.002)  # 1000 tokens/s
    _record(throughput, 2, speculative=True, tokens=4, seconds=0.005)  # 800 tokens/s: a wave's first steps
    assert "step_verdict_slower_b1" not in throughput.summary() and not throughput.verdicts, "asking forms no verdict"
    assert not throughput.measured_slower(2, False), "slower, but not under STRONGLY_SLOWER: keep measuring"
    assert throughput.summary()["step_verdict_slower_b1"] == 0.0
    _record(throughput, 2, speculative=True, tokens=2, seconds=0.005, steps=WINDOW_ENTRIES)  # 400 tokens/s
    assert 400 < STRONGLY_SLOWER * 1000 and throughput.measured_slower(2, False)
    assert throughput.summary()["step_verdict_slower_b1"] == 1.0


def _cohort(throughput: MeasuredThroughput, paces: dict[str, int], tokens: int, seconds: float,
            plain_step: float) -> None:
    """Requests (id -> tokens per step) start decoding together and speculate, each until it
    has ``tokens`` tokens, in ``seconds`` a step; plain decoding takes ``plain_step`` a token."""
    emitted = dict.fromkeys(paces, 0)
    while any(count < tokens for count in emitted.values()):
        running = [req_id for req_id, count in emitted.items() if count < tokens]
        throughput.retain(running)
        step = [min(paces[req_id], tokens - emitted[req_id]) for req_id in running]
        throughput.cohorts.record_step(running, [True] * len(running), step, seconds, plain_step, speculative=True,
                                       all_sampled=False)
        for req_id, count in zip(running, step):
            emitted[req_id] += count
    throughput.retain([])


def test_a_bucket_judges_speculation_on_its_finished_cohorts_once_it_has_enough():
    """Steps that measure speculation a little slower (a wave's start) do not decide; cohorts
    do once COHORTS_TO_JUDGE have finished: their mean speedup, the slowest request's each."""
    throughput = MeasuredThroughput()
    _record(throughput, 2, speculative=False, tokens=2, seconds=0.002)  # 1000 tokens/s
    _record(throughput, 2, speculative=True, tokens=8, seconds=0.010)  # 800 tokens/s
    assert not throughput.measured_slower(2, False)
    # b emits 2 of its 36 tokens a step (18 steps of 4.5 ms) where plain decoding takes 2 ms
    # a token: 72 of 81 ms, a 0.89x cohort, although a was done after 6 steps.
    _cohort(throughput, {"a": 7, "b": 2}, tokens=36, seconds=0.0045, plain_step=0.002)
    assert abs(throughput.cohorts.results[(1, False)][-1].speedup - 72 / 81) < 1e-9
    assert abs(throughput.summary()["cohort_speedup_b1"] - 72 / 81) < 1e-9
    assert COHORTS_TO_JUDGE == 2 and 72 / 81 > CLEARLY_SLOWER
    assert not throughput.measured_slower(2, False), "one cohort not clearly slower is not enough"
    _cohort(throughput, {"c": 3, "d": 3}, tokens=36, seconds=0.005, plain_step=0.002)  # 1.2x
    assert throughput.measured_slower(2, False) is False, "mean of 0.89 and 1.2"
    _cohort(throughput, {"e": 2, "f": 1}, tokens=36, seconds=0.005, plain_step=0.002)  # 0.4x
    assert throughput.measured_slower(2, False), "mean of 0.89, 1.2 and 0.4"
    assert throughput.measured_slower(8, False), "larger batch sizes inherit it"
    _record(throughput, 2, speculative=False, tokens=2, seconds=0.002, steps=STALE_AFTER_PLAIN_STEPS)
    assert not throughput.measured_slower(2, False), "stale: the cohorts are dropped with the samples"


def test_cohorts_a_little_slower_are_re_examined_sooner_and_each_confirmation_doubles_the_wait():
    """Cohorts at 0.9x of plain decoding, 36 tokens each: re-examining them speculates on
    COHORTS_TO_JUDGE cohorts, losing 0.1 of 36 plain steps each, so the verdict goes stale
    after that over REEXAMINATION_LOSS plain steps (144, not STALE_AFTER_PLAIN_STEPS);
    confirmed by two more such cohorts, it holds twice as long."""
    throughput = MeasuredThroughput()
    _record(throughput, 2, speculative=False, tokens=2, seconds=0.002)
    waits = []
    for confirmations in range(2):
        for pair in ("ab", "cd"):
            _cohort(throughput, {f"{pair[0]}{confirmations}": 2, f"{pair[1]}{confirmations}": 2}, tokens=36,
                    seconds=2 * 0.002 / 0.9, plain_step=0.002)
        _record(throughput, 2, speculative=True, tokens=4, seconds=2 * 0.002 / 0.9, steps=1)  # their last step
        speedup = throughput.cohorts.mean_speedup((1, False), COHORTS_TO_JUDGE)
        assert abs(speedup - 0.9) < 1e-9 and throughput.measured_slower(2, False)
        wait = math.ceil(COHORTS_TO_JUDGE * (1 - speedup) * 36 / REEXAMINATION_LOSS) * 2**confirmations
        _record(throughput, 2, speculative=False, tokens=2, seconds=0.002, steps=wait - 1)
        assert throughput.measured_slower(2, False), f"re-examined before {wait} plain steps"
        _record(throughput, 2, speculative=False, tokens=2, seconds=0.002, steps=1)
        assert not throughput.measured_slower(2, False), f"not re-examined after {wait} plain steps"
        waits.append(wait)
    assert waits == [144, 288] and waits[0] < STALE_AFTER_PLAIN_STEPS


def test_a_first_cohort_clearly_slower_decides_alone_when_it_has_enough_requests():
    throughput = MeasuredThroughput()
    _cohort(throughput, {"solo": 1}, tokens=36, seconds=0.005, plain_step=0.002)  # 0.4x at B=1
    _cohort(throughput, {"a": 2, "b": 1}, tokens=36, seconds=0.005, plain_step=0.002)  # 0.4x
    assert 0.4 < CLEARLY_SLOWER and DECIDING_MEMBERS > 2
    assert not throughput.measured_slower(1, False), "one request is too few to decide alone"
    assert not throughput.measured_slower(2, False), "two requests are too few to decide alone"
    paces = {f"r{index}": 2 for index in range(DECIDING_MEMBERS - 1)} | {"slow": 1}
    _cohort(throughput, paces, tokens=36, seconds=0.005, plain_step=0.002)  # 0.4x
    assert throughput.measured_slower(DECIDING_MEMBERS, False) and throughput.measured_slower(32, False)
    assert not throughput.measured_slower(2, False), "smaller batch sizes do not inherit it"


def test_cohorts_that_never_speculated_are_no_evidence():
    throughput = MeasuredThroughput()
    throughput.cohorts.record_step(["a", "b"], [True, True], [1, 1], 0.002, 0.002, speculative=False,
                                   all_sampled=False)
    throughput.retain([])
    assert not throughput.cohorts.results
    throughput.cohorts.record_prompt_step(["c"], [True], [1], drafting_seconds=0.004, plain_step_seconds=0.002,
                                          all_sampled=True)
    throughput.cohorts.record_step(["c", "x"], [True, False], [3, 1], 0.004, 0.002, speculative=True,
                                   all_sampled=True)
    throughput.retain(["x"])
    assert {key: [result.speedup for result in window] for key, window in throughput.cohorts.results.items()} == {
        (0, True): [3 * 0.002 / (0.004 + 0.004)]}, (
        "keyed by the prompt step's batch; its draft pass delays it; x was never drafted")


def test_an_engine_feeds_each_drafted_request_s_tokens_to_its_cohort(cast_llm, monkeypatch):
    """Real engine, greedy, a qa and an MT-Bench request decoding together: every step of
    theirs reaches the cohort ledger with each request's own tokens, except decode steps that
    ran a shape for the first time (kernel set-up, paid once per shape), and when both are
    done their cohort's speedup is the largest plain-decoding time over the largest time in
    the batch (the slowest request's)."""
    runner = model_runner(cast_llm)
    unrecorded: dict[str, int] = {}  # request -> tokens it emitted on first-run steps
    first_run_of_a_shape = runner._first_run_of_a_shape

    def noted_first_run(decision):
        first_run = first_run_of_a_shape(decision)
        if first_run:
            batch = runner.input_batch.num_reqs
            for req_id, tokens in zip(runner.input_batch.req_ids[:batch], runner._emitted_by_request(batch)):
                unrecorded[req_id] = unrecorded.get(req_id, 0) + tokens
        return first_run

    monkeypatch.setattr(runner, "_first_run_of_a_shape", noted_first_run)
    cohorts = runner.drafter.throughput.cohorts
    totals: dict[str, list[float]] = {}  # request -> [seconds, plain seconds, tokens]
    record_step, record_prompt_step = cohorts.record_step, cohorts.record_prompt_step

    def add(req_ids, emitted, seconds, plain_step, drafted_tokens):
        for req_id, tokens in zip(req_ids, emitted):
            total = totals.setdefault(req_id, [0.0, 0.0, 0])
            total[0] += seconds
            total[1] += (tokens - (0 if drafted_tokens else 1)) * plain_step
            total[2] += tokens

    def recorded_step(req_ids, joining, emitted, seconds, plain_step, speculative, all_sampled):
        add(req_ids, emitted, seconds, plain_step, True)
        return record_step(req_ids, joining, emitted, seconds, plain_step, speculative, all_sampled)

    def recorded_prompt_step(req_ids, joining, emitted, drafting, plain_step, all_sampled):
        add(req_ids, emitted, drafting, plain_step, False)
        return record_prompt_step(req_ids, joining, emitted, drafting, plain_step, all_sampled)

    monkeypatch.setattr(cohorts, "record_step", recorded_step)
    monkeypatch.setattr(cohorts, "record_prompt_step", recorded_prompt_step)
    before = list(cohorts.results.get((1, False), []))
    greedy_token_ids(cast_llm, load_prompts("qa", limit=1) + load_prompts("mt_bench", limit=1), 32)
    runner.drafter.retain([])  # the next step's batch would close their lives
    assert len(totals) == 2 and all(tokens + unrecorded.get(req_id, 0) == 32
                                    for req_id, (_, _, tokens) in totals.items()), (totals, unrecorded)
    after = [result.speedup for result in cohorts.results[(1, False)]]
    assert len(after) == min(len(before) + 1, COHORT_WINDOW), "their cohort was not completed"
    slowest = max(seconds for seconds, _, _ in totals.values())
    assert abs(after[-1] - max(plain for _, plain, _ in totals.values()) / slowest) < 1e-9


def test_drafting_new_prompts_is_charged_to_speculation():
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=8, seconds=0.010)  # 800 tokens/s per decode step
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.003)  # 1333 tokens/s
    assert not throughput.measured_slower(4, False), "not under half of plain decoding's rate"
    throughput.record_prompt_drafting(4, False, seconds=0.010 * MIN_STEPS)  # the draft's pass over new prompts
    assert throughput.measured_slower(4, False), "8 tokens per 20 ms: 400 tokens/s"
    throughput.record_prompt_drafting(4, False, seconds=0.001, accepted_drafts=8 * MIN_STEPS)  # decoding rows' gains
    assert not throughput.measured_slower(4, False), "16 tokens per ~20 ms: ~800 tokens/s"


def test_measured_slower_speculation_holds_until_its_samples_are_stale():
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.020)  # 300 tokens/s
    assert not throughput.measured_slower(4, False), "plain decoding not measured yet"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005)  # 800 tokens/s
    assert throughput.measured_slower(4, False)
    assert not throughput.measured_slower(4, True), "sampled verification is judged on its own"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS - MIN_STEPS - 1)
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=1)
    assert not throughput.measured_slower(4, False), "speculative samples this old are dropped"
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.020, steps=MIN_STEPS - 1)
    assert not throughput.measured_slower(4, False), "speculation is measured afresh"
    _record(throughput, 4, speculative=True, tokens=6, seconds=0.020, steps=1)
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS)
    assert throughput.measured_slower(4, False), "confirmed slower once more: the next wait is twice as long"
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005, steps=STALE_AFTER_PLAIN_STEPS)
    assert not throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=True, tokens=12, seconds=0.010)  # 1200 tokens/s: pays now
    assert not throughput.measured_slower(4, False)
    assert not throughput.times_stale[(2, False)], "the next wait is the first again"


def test_a_verdict_is_not_rejudged_by_plain_steps_that_follow_it():
    """Plain steps measured later (another task, a slower machine state) do not flip a slower
    verdict into exploring again; the next speculative sample forms it afresh."""
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=True, tokens=18, seconds=0.050)  # 360 tokens/s
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.005)  # 800 tokens/s
    assert throughput.measured_slower(4, False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.008, steps=WINDOW_ENTRIES)  # 500 tokens/s
    assert throughput.measured_slower(4, False), "held against the plain steps of its time"
    assert throughput.should_decline(4, False)
    throughput.record(4, False, True, 18, 0.050)
    assert not throughput.measured_slower(4, False), "a new speculative sample is judged against plain now"


def test_a_slower_verdict_at_a_smaller_batch_size_rules_out_larger_ones_until_stale():
    throughput = MeasuredThroughput()
    _record(throughput, 2, speculative=True, tokens=3, seconds=0.020)  # 150 tokens/s
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
    _record(throughput, 4, speculative=True, tokens=8, seconds=0.020, steps=MIN_STEPS + 2)  # 400 tokens/s
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


def test_a_solo_request_is_probed_unless_no_recent_requests_rate_could_pay():
    """A request decoding alone is judged on its own probes, not on the pooled verdicts: it
    is never hopeless while its probes measure no slower, hopeless once they measured slower
    where its mode is not re-probed. Before its probes, and while it waits for a re-probe,
    it is hopeless only when no chain pays even at the best recent request's own first-rank
    rate (the priced verdict with ``best_rate``)."""
    throughput = MeasuredThroughput()
    _record(throughput, 1, speculative=True, tokens=1, seconds=0.010, sampled=True)
    _record(throughput, 1, speculative=False, tokens=1, seconds=0.004, sampled=True)  # pooled: slower
    priced_at: list[bool] = []

    def no_chain_pays_at_best_rate(batch_size: int, context: float, all_sampled: bool, best_rate: bool) -> bool:
        priced_at.append(best_rate)
        return hopeless_at_best_rate

    judge = _hopeless_judge(throughput, no_chain_pays_at_best_rate)
    judge.solo = SimpleNamespace(reprobes=lambda all_sampled: True)
    hopeless = CastProposer.speculation_hopeless
    for hopeless_at_best_rate in (False, True):
        judge._hopeless_memo.clear()
        judge.awaits_solo_probe = lambda all_sampled: True
        assert hopeless(judge, 1, 300.0, True) == hopeless_at_best_rate, "awaiting its probe"
        judge.awaits_solo_probe = lambda all_sampled: False
        judge._solo_slower = lambda: True
        assert hopeless(judge, 1, 300.0, True) == hopeless_at_best_rate, "slower, waiting for its re-probe"
        judge._solo_slower = lambda: False
        assert not hopeless(judge, 1, 300.0, True), "its own probes measured no slower"
        judge._solo_slower = lambda: None
    assert priced_at and all(priced_at), "solo requests are priced at the best recent rate"
    judge.solo = SimpleNamespace(reprobes=lambda all_sampled: False)
    judge._solo_slower = lambda: True
    assert hopeless(judge, 1, 300.0, True), "slower where its mode is not re-probed"
    judge._solo_slower = lambda: None
    assert hopeless(judge, 1, 300.0, True), "not probed: the pooled verdicts rule it"


def test_a_measured_slower_verdict_is_not_hidden_by_a_memoised_price():
    """The proposer memoises its priced verdict per (batch, context bucket, mode); a later
    measurement that speculating is slower must still make speculation hopeless there."""
    throughput = MeasuredThroughput()
    proposer = _hopeless_judge(throughput, no_chain_can_pay=lambda *args: False)
    assert not CastProposer.speculation_hopeless(proposer, 16, 300.0, False), "priced: a chain can pay"
    _record(throughput, 16, speculative=True, tokens=20, seconds=0.025)  # 800 tokens/s
    _record(throughput, 16, speculative=False, tokens=16, seconds=0.008)  # 2000 tokens/s
    assert CastProposer.speculation_hopeless(proposer, 16, 300.0, False)


def test_decode_steps_faster_leaves_out_the_draft_s_passes_over_new_prompts():
    throughput = MeasuredThroughput()
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.006)  # 667 tokens/s
    throughput.record_prompt_drafting(4, False, seconds=0.200)  # long prompts' first pass
    _record(throughput, 4, speculative=True, tokens=12, seconds=0.015, steps=MIN_STEPS - 1)  # 800 tokens/s
    assert not throughput.decode_steps_faster(4, False), "too few speculative decode steps"
    _record(throughput, 4, speculative=True, tokens=12, seconds=0.015, steps=1)
    assert throughput.measured_slower(4, False), "with the prompt pass: 48 tokens in 0.26 s"
    assert throughput.decode_steps_faster(4, False)
    assert not throughput.measured_slower(4, False, prompts_paid=True), "the prompt pass is paid"
    assert throughput.should_decline(4, False) and not throughput.should_decline(4, False, prompts_paid=True)
    assert not throughput.decode_steps_faster(4, True), "sampled verification is judged on its own"
    assert not throughput.decode_steps_faster(16, False), "other batch sizes are judged on their own"
    _record(throughput, 4, speculative=True, tokens=4, seconds=0.030, steps=WINDOW_ENTRIES)  # 133 tokens/s
    assert not throughput.decode_steps_faster(4, False), "recent decode steps decide"


def test_requests_whose_prompts_were_read_keep_drafting_while_their_decode_steps_gain():
    """A "slower" verdict that charges the draft's passes over new prompts to speculation
    undrafts arriving requests, not those whose passes are paid and whose steps gain."""
    throughput = MeasuredThroughput()
    proposer = _hopeless_judge(throughput, no_chain_can_pay=lambda *args: False)
    _record(throughput, 4, speculative=False, tokens=4, seconds=0.006)
    throughput.record_prompt_drafting(4, False, seconds=0.200)
    _record(throughput, 4, speculative=True, tokens=12, seconds=0.015)
    assert CastProposer.speculation_hopeless(proposer, 4, 300.0, False), "new prompts would not be repaid"
    assert not CastProposer.speculation_hopeless(proposer, 4, 300.0, False, prompts_paid=True)
    _record(throughput, 4, speculative=True, tokens=4, seconds=0.030, steps=WINDOW_ENTRIES)
    assert CastProposer.speculation_hopeless(proposer, 4, 300.0, False, prompts_paid=True), "decode steps lose too"


def test_a_batch_size_that_never_verified_is_priced_at_the_smaller_ones_too():
    """No chain can pay at B=16 by price, but the table's B=32 cells say one can (the
    profile priced verifying 2 tokens a request like a plain step): until B=32 has measured
    its own verifications, B=32 is hopeless too; smaller batch sizes are not affected."""
    overheads = StepOverheads()
    proposer = _hopeless_judge(MeasuredThroughput(), lambda batch_size, *args: batch_size == 16, overheads)
    hopeless = CastProposer.speculation_hopeless
    assert hopeless(proposer, 16, 300.0, False)
    assert hopeless(proposer, 32, 300.0, False), "B=32 never verified: B=16's price rules it"
    assert hopeless(proposer, 17, 300.0, False), "any batch size of the bucket above"
    assert not hopeless(proposer, 8, 300.0, False), "a smaller batch size is priced on its own"
    for _ in range(MIN_SAMPLES):
        overheads.record_step(32, measured=0.012, predicted=0.0095, verified_drafts=True)
    assert not hopeless(proposer, 32, 300.0, False), "measured verifications: B=32 is priced on its own"
