"""Skipping the draft model while CAST does not speculate (vllm_cast.dormancy)."""

from __future__ import annotations

from collections import Counter

import torch
from conftest import cast_stats, greedy_token_ids, model_runner
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_cast.dormancy import DraftDormancy
from vllm_cast.prompts import TASKS, load_prompts
from vllm_cast.proposer import PLAIN_FIRST_STEPS
from vllm_cast.step_overheads import StepOverheads, batch_bucket
from vllm_cast.throughput import MIN_STEPS, MeasuredThroughput

BLOCK = 4


def _step(positions: list[list[int]], width: int = 3):
    """Rows of one step for requests with the given positions: tokens = position * 10,
    hidden rows filled with the position."""
    flat = torch.tensor([p for request in positions for p in request])
    starts = [0]
    for request in positions:
        starts.append(starts[-1] + len(request))
    return flat * 10, flat, flat[:, None].float().expand(-1, width).clone(), starts


def _metadata(starts: list[int], table: torch.Tensor) -> CommonAttentionMetadata:
    query_start = torch.tensor(starts, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start, seq_lens=torch.zeros(len(starts) - 1),
        num_reqs=len(starts) - 1, num_actual_tokens=starts[-1], max_query_len=1, max_seq_len=64,
        block_table_tensor=table, slot_mapping=torch.zeros(starts[-1], dtype=torch.int64))


def test_replay_prepends_remembered_rows_in_order_with_their_slots():
    dormancy = DraftDormancy(probe_interval=2, max_rows=100)
    dormancy.enter()
    assert dormancy.should_skip(2) and not dormancy.should_skip(2), "first stretch: one step"
    dormancy.enter()
    table = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]], dtype=torch.int32)
    for step in range(2):
        tokens, positions, hidden, starts = _step([[5 + step], [9 + step]])
        assert dormancy.should_skip(tokens.numel())
        dormancy.remember(["a", "b"], tokens, positions, hidden, starts)
    assert not dormancy.should_skip(2), "the probe step must draft"
    tokens, positions, hidden, starts = _step([[7], [11, 12]])  # b: a two-token step
    tokens, positions, hidden, cad, last_rows = dormancy.replay(
        ["a", "b"], tokens, positions, hidden, _metadata(starts, table), BLOCK)
    assert positions.tolist() == [5, 6, 7, 9, 10, 11, 12]
    assert tokens.tolist() == [50, 60, 70, 90, 100, 110, 120]
    assert hidden[:, 0].tolist() == [5, 6, 7, 9, 10, 11, 12]
    assert cad.query_start_loc_cpu.tolist() == [0, 3, 7]
    assert last_rows.tolist() == [2, 6]
    expected_slots = [int(table[r, p // BLOCK]) * BLOCK + p % BLOCK for r, p in
                      [(0, 5), (0, 6), (0, 7), (1, 9), (1, 10), (1, 11), (1, 12)]]
    assert cad.slot_mapping.tolist() == expected_slots
    assert not dormancy.stash and dormancy.stashed_rows == 0


def test_dormant_stretches_back_off_and_reset_after_a_tree():
    dormancy = DraftDormancy(probe_interval=4, max_rows=100)

    def stretch() -> int:
        dormancy.enter()
        skipped = 0
        while dormancy.should_skip(1):
            skipped += 1
        return skipped

    assert [stretch() for _ in range(4)] == [1, 2, 4, 4]
    dormancy.wake()
    assert stretch() == 1


def test_a_restart_ends_the_dormant_stretch_and_the_back_off():
    dormancy = DraftDormancy(probe_interval=64, max_rows=100)
    for _ in range(7):
        dormancy.enter()
    assert dormancy.steps_left == 64 and dormancy.next_interval == 64
    dormancy.restart()
    assert not dormancy.should_skip(1), "the stretch ended: the next step drafts"
    dormancy.enter()
    assert dormancy.should_skip(1) and not dormancy.should_skip(1), "backing off from one step again"


def test_rows_of_a_recomputed_or_finished_request_are_dropped():
    dormancy = DraftDormancy(probe_interval=4, max_rows=100)
    tokens, positions, hidden, starts = _step([[5], [9]])
    dormancy.remember(["a", "b"], tokens, positions, hidden, starts)
    tokens, positions, hidden, starts = _step([[0, 1, 2]])  # "a" preempted: recomputed from 0
    dormancy.remember(["a"], tokens, positions, hidden, starts)
    stash = dormancy.remembered(["a"])
    assert list(stash) == ["a"] and stash["a"].positions.tolist() == [0, 1, 2]
    assert dormancy.stashed_rows == 3


def test_dormant_cast_equals_vanilla_and_skips_the_draft(vanilla_llm, default_cast_llm):
    prompts = [load_prompts(task, limit=1)[0] for task in TASKS]
    before = cast_stats(default_cast_llm)["dormant_steps"]
    assert greedy_token_ids(default_cast_llm, prompts, 40) == greedy_token_ids(vanilla_llm, prompts, 40)
    assert cast_stats(default_cast_llm)["dormant_steps"] > before, "CAST never skipped the draft model"


def test_requests_are_not_drafted_while_hopeless(vanilla_llm, default_cast_llm, monkeypatch):
    """Speculation hopeless (forced): the batch's requests are undrafted before their prompt
    step and never get drafts, nothing is stashed, every step runs as vLLM's plain decoding
    (no drafter call, prompt steps included, no EAGLE-3 auxiliary hidden states collected),
    and output stays vanilla's. Once speculation may pay again, new requests are drafted
    (the auxiliary hidden states are back) and output is still vanilla's."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda *args, **kwargs: True)
    drafting_calls = []
    propose = runner.propose_draft_token_ids

    def counted_propose(*args, **kwargs):
        drafting_calls.append(runner._decode_only)
        return propose(*args, **kwargs)

    monkeypatch.setattr(runner, "propose_draft_token_ids", counted_propose)
    forward_outputs = []
    forward = runner.model.forward

    def recorded_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        forward_outputs.append(isinstance(output, tuple))  # (hidden states, auxiliary hidden states)
        return output

    monkeypatch.setattr(runner.model, "forward", recorded_forward)
    prompts = load_prompts("sum", limit=8)
    before = cast_stats(default_cast_llm)
    assert greedy_token_ids(default_cast_llm, prompts, 24) == greedy_token_ids(vanilla_llm, prompts, 24)
    after = cast_stats(default_cast_llm)
    assert after["undrafted_requests"] - before["undrafted_requests"] == len(prompts)
    assert after["verified_drafts"] == before["verified_drafts"], "an undrafted request was given drafts"
    assert runner.drafter.dormancy.stashed_rows == 0
    assert not drafting_calls, "a step of undrafted requests took the speculative path"
    assert forward_outputs and not any(forward_outputs), "plain steps collected the draft's auxiliary hidden states"

    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    monkeypatch.setattr(runner.drafter, "measures_plain_first", lambda *args: False)
    forward_outputs.clear()
    prompts = load_prompts("mt_bench", limit=2)  # prompts whose draft pass 24 new tokens can repay
    assert greedy_token_ids(default_cast_llm, prompts, 24) == greedy_token_ids(vanilla_llm, prompts, 24)
    assert cast_stats(default_cast_llm)["verified_drafts"] > after["verified_drafts"], "new requests were not drafted"
    assert forward_outputs[0], "the first step of drafted requests had no auxiliary hidden states"


def test_rows_of_finished_requests_are_dropped_while_no_request_is_drafted(vanilla_llm, default_cast_llm,
                                                                          monkeypatch):
    """Rows remembered for a request that finished while dormant, then a batch whose every
    request is undrafted from its first step (no prompt pass could pay, forced): the stash
    is emptied, since no request will replay those rows, and output stays vanilla's."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "prompt_pass_pays", lambda *args: False)
    dormancy = runner.drafter.dormancy
    dormancy.remember(["finished-while-dormant"], torch.zeros(3, dtype=torch.long), torch.arange(3), torch.zeros(3, 8),
                      [0, 3])
    prompts = load_prompts("qa", limit=4)
    before = cast_stats(default_cast_llm)["undrafted_requests"]
    assert greedy_token_ids(default_cast_llm, prompts, 8) == greedy_token_ids(vanilla_llm, prompts, 8)
    assert cast_stats(default_cast_llm)["undrafted_requests"] - before == len(prompts)
    assert dormancy.stashed_rows == 0, "rows no request will replay are still kept"


def test_sampled_requests_stop_being_drafted_once_probes_measure_slower(default_cast_llm):
    """T=1 on this fixture, one request at a time: each request's solo probes (and any
    dormant probes) measure slower than plain decoding, so it is undrafted; once no recent
    probe paid, later requests are undrafted from their prompt on (no draft pass over long
    prompts). A probe's step is a throughput sample once its row counts have run before in
    this engine (the first run of each is not: vllm_cast.runner's ``_first_run_of_a_shape``)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=0)
    before = cast_stats(default_cast_llm)["undrafted_requests"]
    prompts = load_prompts("qa", limit=12)
    for prompt in prompts:  # one at a time: batch size 1, as the probes were measured
        default_cast_llm.generate([prompt], params, use_tqdm=False)
    undrafted = cast_stats(default_cast_llm)["undrafted_requests"] - before
    assert undrafted >= len(prompts) // 2, f"only {undrafted} of {len(prompts)} sampled requests were undrafted"


def test_a_batch_size_measures_plain_decoding_before_it_drafts(vanilla_llm, default_cast_llm, monkeypatch):
    """At a batch size where plain decoding was never measured, CAST first skips the draft
    model (keeping the rows) until it has, then drafts: the first drafting step replays the
    kept rows, and output stays vanilla's. The steps that keep rows run as vLLM's plain
    decoding (its speculative input preparation and drafter call are not taken) unless the
    step before drafted first-layer candidates whose outcomes they record."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    monkeypatch.setattr(drafter, "throughput", MeasuredThroughput())  # no batch size measured yet
    monkeypatch.setattr(drafter, "plain_first_steps", Counter())
    monkeypatch.setattr(drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    monkeypatch.setattr(drafter.dormancy, "steps_left", 0)
    answers = []
    measures = drafter.measures_plain_first
    monkeypatch.setattr(drafter, "measures_plain_first", lambda *args: answers.append(measures(*args)) or answers[-1])
    replayed = []
    replay = drafter.dormancy.replay
    monkeypatch.setattr(drafter.dormancy, "replay", lambda *args: replayed.append(replay(*args)) or replayed[-1])
    drafter_calls = []  # (keeps its rows, has outcomes to record) per drafter call
    propose = runner.propose_draft_token_ids
    monkeypatch.setattr(runner, "propose_draft_token_ids", lambda *args: drafter_calls.append(
        (runner._keeps_rows, runner._root_candidates is not None)) or propose(*args))
    prompts = load_prompts("humaneval", limit=4)
    before = cast_stats(default_cast_llm)["steps"]
    assert greedy_token_ids(default_cast_llm, prompts, 24) == greedy_token_ids(vanilla_llm, prompts, 24)
    skipped_first = answers.index(False)
    assert MIN_STEPS < skipped_first <= PLAIN_FIRST_STEPS, answers
    assert not any(answers[skipped_first:]), "plain decoding was measured: no more skipping"
    assert drafter.throughput.plain_rate(len(prompts), False) is not None
    assert drafter.plain_first_steps[(batch_bucket(len(prompts)), False)] == skipped_first
    assert replayed and replayed[0] is not None, "the first drafting step replays the kept rows"
    keeping = [recording for keeps_rows, recording in drafter_calls if keeps_rows]
    assert all(keeping), "a step keeping its rows took vLLM's speculative path with nothing to record"
    assert len(keeping) < skipped_first, "no step keeping its rows ran as vLLM's plain decoding"
    assert cast_stats(default_cast_llm)["steps"] > before, "drafting resumed"


def test_stale_plain_samples_are_measured_afresh_in_a_drafted_stretch(vanilla_llm, default_cast_llm, monkeypatch):
    """Where CAST drafts, every step verifies drafts and no plain step is measured; once the
    batch size's plain samples are older than ``PLAIN_SAMPLES_LAST`` (0 here), a drafting
    call drafts nothing, the samples are dropped and the next ``PLAIN_FIRST_STEPS`` steps run
    plain, keeping their rows, and yield fresh samples; a refresh left from another batch
    size ends at the first step. Output stays vanilla's."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    for name in ("step_overheads", "proposer"):
        monkeypatch.setattr(f"vllm_cast.{name}.PLAIN_SAMPLES_LAST", 0.0)
    monkeypatch.setattr(drafter, "throughput", MeasuredThroughput())
    monkeypatch.setattr(drafter, "overheads", StepOverheads())
    monkeypatch.setattr(drafter, "plain_first_steps", Counter())
    monkeypatch.setattr(drafter, "plain_refresh", (batch_bucket(32), PLAIN_FIRST_STEPS))  # left from a batch of 32
    monkeypatch.setattr(drafter, "plain_measured_at", {})
    monkeypatch.setattr(drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    monkeypatch.setattr(drafter.throughput, "should_decline", lambda *args: False)
    monkeypatch.setattr(drafter.dormancy, "steps_left", 0)
    events = []  # ("refresh", starts one) per drafting call past its first pass, ("skip", skips) per undrafted step
    refresh, measures = drafter._starts_plain_refresh, drafter.measures_plain_first
    monkeypatch.setattr(drafter, "_starts_plain_refresh",
                        lambda *args: events.append(("refresh", refresh(*args))) or events[-1][1])
    monkeypatch.setattr(drafter, "measures_plain_first",
                        lambda *args: events.append(("skip", measures(*args))) or events[-1][1])
    forgotten = []
    forget = drafter.overheads.forget_plain
    monkeypatch.setattr(drafter.overheads, "forget_plain", lambda batch: forgotten.append(batch) or forget(batch))
    prompts = load_prompts("gsm8k", limit=4)
    assert greedy_token_ids(default_cast_llm, prompts, 48) == greedy_token_ids(vanilla_llm, prompts, 48)
    started = events.index(("refresh", True))
    following = [skips for kind, skips in events[started + 1:] if kind == "skip"]
    assert following[:PLAIN_FIRST_STEPS] == [True] * PLAIN_FIRST_STEPS, events
    assert forgotten and set(forgotten) == {len(prompts)}
    assert drafter.overheads.plain.median(batch_bucket(len(prompts))) is not None, "no fresh plain samples"
    left = drafter.plain_refresh
    assert left is None or left[0] != batch_bucket(32), "a refresh outlived its batch size"
