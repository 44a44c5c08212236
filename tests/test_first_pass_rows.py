"""Requests CAST never drafts stay out of the draft model's first pass (vllm_cast.first_pass_rows)."""

from __future__ import annotations

import torch
from conftest import cast_stats, greedy_token_ids, model_runner
from vllm import SamplingParams
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_cast.first_pass_rows import drafted_rows_only, recurring_first_pass_rows
from vllm_cast.prompts import load_prompts


def _rows(lengths: list[int]):
    """Tokens 100 + row, positions = row, hidden rows filled with the row, attention metadata."""
    total = sum(lengths)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cad = CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=torch.tensor(lengths) + 10,
        num_reqs=len(lengths), num_actual_tokens=total, max_query_len=max(lengths), max_seq_len=99,
        block_table_tensor=torch.zeros(len(lengths), 4, dtype=torch.int32), slot_mapping=torch.arange(total) + 1000)
    rows = torch.arange(total)
    return rows + 100, rows, rows[:, None].float().expand(-1, 3).clone(), cad


def test_undraftable_requests_keep_only_their_sampled_row():
    tokens, positions, hidden, cad = _rows([4, 1, 5, 2])
    sample_rows = torch.tensor([2, 4, 9, 10], dtype=torch.int32)  # request 0 verified drafts, 2 rejected
    tokens, positions, hidden, sample_rows, cad = drafted_rows_only(
        [True, False, False, True], tokens, positions, hidden, sample_rows, cad)
    kept = [0, 1, 2, 3, 4, 9, 10, 11]
    assert positions.tolist() == kept and tokens.tolist() == [100 + row for row in kept]
    assert hidden[:, 0].tolist() == kept
    assert cad.slot_mapping.tolist() == [1000 + row for row in kept]
    assert cad.query_start_loc_cpu.tolist() == [0, 4, 5, 6, 8] and cad.num_actual_tokens == 8
    assert cad.max_query_len == 4 and cad.seq_lens.tolist() == [14, 11, 15, 12], "contexts are unchanged"
    assert sample_rows.tolist() == [2, 4, 5, 6], "each request's sampled row, where it now lies"


def test_a_prompt_s_rows_are_priced_as_at_most_a_tree_s_emitted_tokens():
    prompt_step = _rows([300, 4, 2, 3])[3].query_start_loc_cpu
    assert recurring_first_pass_rows(prompt_step, 7) == (7 + 4 + 2 + 3) / 4
    decode_step = _rows([3, 2])[3].query_start_loc_cpu
    assert recurring_first_pass_rows(decode_step, 7) == 2.5, "a decode step's rows are its own"


def test_nothing_changes_when_every_request_is_drafted_or_has_one_row():
    inputs = _rows([3, 1])
    assert drafted_rows_only([True, True], *inputs[:3], None, inputs[3]) == (*inputs[:3], None, inputs[3])
    single = _rows([1, 1])
    assert drafted_rows_only([False, True], *single[:3], None, single[3])[4] is single[3]


def _first_pass_rows(runner, monkeypatch) -> list[int]:
    """Rows of every draft first pass from now on."""
    counts = []
    first_pass = runner.drafter._first_pass

    def counted(target_token_ids, *args, **kwargs):
        counts.append(target_token_ids.shape[0])
        return first_pass(target_token_ids, *args, **kwargs)

    monkeypatch.setattr(runner.drafter, "_first_pass", counted)
    return counts


def _generate_in_steps(llm, arrivals: list[list[str]], max_tokens: int) -> list[list[int]]:
    """Greedy completions when each group of prompts arrives one engine step after the last."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens)  # as greedy_token_ids
    finished, order = {}, []

    def step() -> None:
        finished.update((output.request_id, list(output.outputs[0].token_ids))
                        for output in engine.step() if output.finished)

    for group, prompts in enumerate(arrivals):
        for prompt in prompts:
            order.append(f"arrival-{group}-{len(order)}")
            engine.add_request(order[-1], prompt, params)
        step()
    while engine.has_unfinished_requests():
        step()
    return [finished[request_id] for request_id in order]


def test_prompts_joining_a_verification_while_hopeless_are_never_drafted(vanilla_llm, default_cast_llm, monkeypatch):
    """A request arriving alone is probed; seven prompts join the step that verifies its
    probe, at a batch size where speculation is hopeless (forced): every request is
    undrafted before that step, the probe is still verified, the draft model never runs
    again, and output stays vanilla's."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda batch_size, *args, **kwargs: batch_size > 1)
    # Whether probing pays is measured on the machine: with every earlier probe slower (CI's
    # 2 cores), the lone request would not be probed.
    runner.drafter.solo.paid[False].append(True)
    prompts = load_prompts("alpaca", limit=8)
    first_pass_rows = _first_pass_rows(runner, monkeypatch)
    before = cast_stats(default_cast_llm)
    tokens = _generate_in_steps(default_cast_llm, [prompts[:1], prompts[1:]], 16)
    after = cast_stats(default_cast_llm)
    assert tokens == greedy_token_ids(vanilla_llm, prompts, 16)
    assert len(first_pass_rows) == 1, f"the draft ran after the lone prompt step: {first_pass_rows}"
    assert after["verified_drafts"] > before["verified_drafts"], "the lone request's probe was not verified"
    assert after["undrafted_requests"] - before["undrafted_requests"] == len(prompts)


def test_a_drafted_prompt_does_not_draft_the_rows_of_prompts_never_drafted(vanilla_llm, default_cast_llm, monkeypatch):
    """Prompts with a repetition penalty (never drafted: logits processing) arrive with one
    that may be drafted: the draft first pass of their prompt step holds that one's prompt
    rows and one row per other request, and output stays vanilla's."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    monkeypatch.setattr(runner.drafter.dormancy, "steps_left", 0)  # not dormant: the prompt step drafts
    monkeypatch.setattr(runner.drafter, "measures_plain_first", lambda *args: False)
    first_pass_rows = _first_pass_rows(runner, monkeypatch)
    prompts = load_prompts("sum", limit=3) + load_prompts("qa", limit=1)
    params = [SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.2)] * 3 + [
        SamplingParams(temperature=0, max_tokens=16)]

    def token_ids(llm) -> list[list[int]]:
        return [list(output.outputs[0].token_ids) for output in llm.generate(prompts, params, use_tqdm=False)]

    assert token_ids(default_cast_llm) == token_ids(vanilla_llm)
    drafted_prompt_tokens = len(default_cast_llm.get_tokenizer().encode(prompts[-1]))
    assert first_pass_rows and first_pass_rows[0] == drafted_prompt_tokens + 3


def test_lone_arrivals_followed_by_bursts_are_not_drafted_alone(vanilla_llm, default_cast_llm, monkeypatch):
    """Bursts whose first request arrives a step before the rest, at a batch size where
    speculation is hopeless (forced): once the last lone arrivals were all joined, a lone
    arrival's prompt step runs no draft pass, and joined it is never drafted. A lone arrival
    that stays alone then drafts its probe one step late, over its prompt rows and its first
    decoded row, even with draft caps and a dormant stretch left by an earlier batch, and
    output stays vanilla's throughout."""
    from vllm_cast.solo_probes import COMPANY_OUTCOMES

    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda batch_size, *args, **kwargs: batch_size > 1)
    monkeypatch.setattr(runner.drafter.solo, "joined", runner.drafter.solo.joined.__class__(maxlen=COMPANY_OUTCOMES))
    prompts = load_prompts("gsm8k", limit=4)
    expected = greedy_token_ids(vanilla_llm, prompts, 12)
    for _ in range(COMPANY_OUTCOMES):
        assert _generate_in_steps(default_cast_llm, [prompts[:1], prompts[1:]], 12) == expected
    assert runner.drafter.solo.expects_company()
    first_pass_rows = _first_pass_rows(runner, monkeypatch)
    assert _generate_in_steps(default_cast_llm, [prompts[:1], prompts[1:]], 12) == expected
    assert not first_pass_rows, "a lone arrival joined by a burst was drafted"
    runner.drafter.solo.resume_probing(False)  # earlier tests' greedy probes may have stopped probing
    # Left by an earlier batch whose first row took no drafts and whose last tree was declined.
    runner.drafter.draft_caps, runner.drafter.draft_caps_req_ids = [0, 0, 0, 5], ["a", "b", "c", "d"]
    monkeypatch.setattr(runner.drafter.dormancy, "steps_left", 2)
    lone = load_prompts("humaneval", limit=1)
    assert _generate_in_steps(default_cast_llm, [lone], 12) == greedy_token_ids(vanilla_llm, lone, 12)
    assert first_pass_rows and first_pass_rows[0] == len(default_cast_llm.get_tokenizer().encode(lone[0])) + 1
    assert not runner.drafter.solo.expects_company()
