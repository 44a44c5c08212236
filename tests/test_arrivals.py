"""Judging arriving requests at the batch size they will decode at (vllm_cast.arrivals)."""

from __future__ import annotations

import numpy as np
from conftest import greedy_token_ids, model_runner

from vllm_cast.arrivals import RECENT_ARRIVALS, ArrivalForecast
from vllm_cast.prompts import load_prompts
from vllm_cast.step_overheads import batch_bucket


def _step(forecast: ArrivalForecast, new: list[str], rows: dict[str, tuple[int, int]]) -> bool:
    """One step of the requests in ``rows`` (request id -> (computed, prompt tokens))."""
    index_of = {req_id: index for index, req_id in enumerate(rows)}
    computed, prompt = (np.array([pair[i] for pair in rows.values()]) for i in (0, 1))
    return forecast.step(new, len(rows), index_of, computed, prompt)


def test_a_wave_arriving_over_several_steps_is_judged_at_its_decoding_batch_size():
    forecast = ArrivalForecast()
    assert _step(forecast, ["a", "b"], {"a": (0, 100), "b": (0, 100)})
    assert forecast.judged_batch_size(2, arriving=True) == 2, "no arrivals decoded yet: the step's own size"
    assert _step(forecast, ["c"], {"a": (100, 100), "b": (64, 100), "c": (0, 100)})
    assert not forecast.decode_batch_sizes, "kept before the whole wave decodes"
    assert not _step(forecast, [], {"a": (101, 100), "b": (100, 100), "c": (100, 100)})
    assert list(forecast.decode_batch_sizes) == [3]

    assert _step(forecast, ["d"], {"d": (0, 100)})
    assert forecast.judged_batch_size(1, arriving=True) == 3
    assert forecast.judged_batch_size(1, arriving=False) == 1, "steps without arrivals are judged as they are"
    assert forecast.judged_batch_size(5, arriving=True) == 5, "never below the step's own size"


def test_the_forecast_follows_a_smaller_arrival_at_once_and_drops_requests_that_left():
    forecast = ArrivalForecast()
    for _ in range(RECENT_ARRIVALS):
        forecast.decode_batch_sizes.append(8)
    assert _step(forecast, ["lone"], {"lone": (0, 10)})
    assert not _step(forecast, [], {"lone": (10, 10)})
    assert forecast.judged_batch_size(1, arriving=True) == 1

    assert _step(forecast, ["gone"], {"gone": (0, 10)})
    assert not _step(forecast, [], {}), "a request that left before decoding is no longer arriving"


def test_a_chunked_wave_is_undrafted_before_the_draft_reads_its_prompts(vanilla_llm, default_cast_llm, monkeypatch):
    """Long prompts (sum) arrive over several 4096-token steps. With speculation hopeless
    from batch size 8 only (forced), the second wave of 8 is judged at 8 from its first
    step, holding 2-3 requests: the draft never runs on its prompts and output is vanilla's."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner, "_arrivals", ArrivalForecast())  # earlier tests' lone arrivals decoded alone
    default_cast_llm.reset_prefix_cache()  # earlier tests' sum prompts would make the first wave's prefill short
    judged_sizes = []

    def hopeless_from_eight(batch_size: int, context: float, all_sampled: bool, prompts_paid: bool = False) -> bool:
        judged_sizes.append(batch_size)
        return batch_size >= 8

    monkeypatch.setattr(runner.drafter, "speculation_hopeless", hopeless_from_eight)
    monkeypatch.setattr(runner.drafter, "prompt_pass_pays", lambda *args: True)  # this test is about the hopeless rule
    prompts = load_prompts("sum", limit=16)
    first_wave, second_wave = prompts[:8], prompts[8:]  # other prompts: no prefix cache hits
    assert greedy_token_ids(default_cast_llm, first_wave, 16) == greedy_token_ids(vanilla_llm, first_wave, 16)
    assert judged_sizes[0] < 8, "the first wave's first step held the whole wave: nothing is tested"

    first_passes = []
    first_pass = runner.drafter._first_pass
    monkeypatch.setattr(runner.drafter, "_first_pass", lambda *args: first_passes.append(args[0].shape[0])
                        or first_pass(*args))
    judged_sizes.clear()
    steps = []
    prepare = runner._prepare_inputs
    monkeypatch.setattr(runner, "_prepare_inputs", lambda output, scheduled: steps.append(len(scheduled))
                        or prepare(output, scheduled))
    assert greedy_token_ids(default_cast_llm, second_wave, 16) == greedy_token_ids(vanilla_llm, second_wave, 16)
    assert steps[0] < 8, "the second wave's first step held the whole wave: nothing is tested"
    assert judged_sizes and min(judged_sizes) == 8
    assert not first_passes, f"the draft read {sum(first_passes)} prompt rows of an undrafted wave"


def test_requests_whose_prompt_pass_cannot_pay_are_never_drafted(vanilla_llm, default_cast_llm, monkeypatch):
    """At a known acceptance rate (forced), a long prompt with 2 new tokens is not drafted
    from its first step (the draft never reads it) and output is vanilla's; a short prompt
    with 16 new tokens is drafted."""
    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner.drafter.calibrator, "first_rank_rate", lambda sampled: 0.5)
    monkeypatch.setattr(runner.drafter, "speculation_hopeless", lambda *args, **kwargs: False)
    first_passes = []
    first_pass = runner.drafter._first_pass
    monkeypatch.setattr(runner.drafter, "_first_pass", lambda *args: first_passes.append(args[0].shape[0])
                        or first_pass(*args))
    before = runner.cast_summary()["undrafted_requests"]
    long_prompt = load_prompts("sum", limit=1)
    assert greedy_token_ids(default_cast_llm, long_prompt, 2) == greedy_token_ids(vanilla_llm, long_prompt, 2)
    assert runner.cast_summary()["undrafted_requests"] == before + 1
    assert not first_passes, "the draft read the prompt of a request it could never repay"

    short_prompt = load_prompts("qa", limit=1)
    assert greedy_token_ids(default_cast_llm, short_prompt, 16) == greedy_token_ids(vanilla_llm, short_prompt, 16)
    assert runner.cast_summary()["undrafted_requests"] == before + 1
    assert first_passes, "a short prompt with 16 new tokens was not drafted"


def test_a_request_arriving_where_prompt_passes_do_not_pay_is_undrafted_alone(vanilla_llm, default_cast_llm,
                                                                               monkeypatch):
    """Speculation measured slower with the draft's passes over new prompts charged, but
    faster on decode steps alone (forced): a request arriving beside one that is decoding is
    undrafted (the draft never reads its prompt), the decoding one stays drafted, and both
    outputs are vanilla's."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    runner = model_runner(default_cast_llm)
    monkeypatch.setattr(runner, "_arrivals", ArrivalForecast())  # earlier tests' arrivals decoded in batches
    judged = []

    def slower_with_prompt_passes(batch_size: int, context: float, all_sampled: bool,
                                  prompts_paid: bool = False) -> bool:
        judged.append(prompts_paid)
        return batch_size > 1 and not prompts_paid

    monkeypatch.setattr(runner.drafter, "speculation_hopeless", slower_with_prompt_passes)
    monkeypatch.setattr(runner.drafter, "prompt_pass_pays", lambda *args: True)  # this test is about the hopeless rule
    undrafted = []
    undraft = runner._undraft
    monkeypatch.setattr(runner, "_undraft", lambda req_ids: undrafted.extend(req_id.split("-")[1] for req_id in req_ids)
                        or undraft(req_ids))
    first_passes = []
    first_pass = runner.drafter._first_pass
    monkeypatch.setattr(runner.drafter, "_first_pass", lambda *args: first_passes.append(args[0].shape[0])
                        or first_pass(*args))
    decoding_prompt, arriving_prompt = load_prompts("mt_bench", limit=1)[0], load_prompts("humaneval", limit=1)[0]
    lengths = {"decoding": 96, "arriving": 24}

    def greedy(name: str) -> SamplingParams:
        params = SamplingParams(temperature=0.0, max_tokens=lengths[name])
        params.output_kind = RequestOutputKind.FINAL_ONLY
        return params

    engine = default_cast_llm.llm_engine
    engine.add_request("paid-decoding", decoding_prompt, greedy("decoding"))
    for _ in range(3):  # its prompt step and two decode steps
        assert not engine.step(), "the decoding request finished before the arrival: nothing is tested"
    assert not undrafted, "the decoding request was undrafted alone"
    first_passes.clear()
    engine.add_request("paid-arriving", arriving_prompt, greedy("arriving"))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    for name, prompt in (("decoding", decoding_prompt), ("arriving", arriving_prompt)):
        assert outputs[f"paid-{name}"] == greedy_token_ids(vanilla_llm, [prompt], lengths[name])[0]
    assert False in judged, "no arrival was judged with its prompt pass to pay"
    assert undrafted == ["arriving"], f"undrafted: {undrafted}"
    arriving_rows = len(default_cast_llm.get_tokenizer()(arriving_prompt).input_ids)
    assert first_passes and max(first_passes) < arriving_rows, \
        f"the draft read the undrafted arrival's prompt ({arriving_rows} rows): first passes {first_passes}"


def test_a_batch_size_that_never_verified_is_not_drafted_where_a_smaller_one_cannot_pay(
        vanilla_llm, default_cast_llm, monkeypatch):
    """No chain can pay at B=2 by price (forced) and B=3-4 has not measured verifications of
    its own: a wave of 4 is undrafted from its first step (the draft never reads its
    prompts), its output is vanilla's, and the priced verdicts asked include B=4's own and
    B=2's."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    monkeypatch.setattr(runner, "_arrivals", ArrivalForecast())
    monkeypatch.setattr(drafter, "prompt_pass_pays", lambda *args: True)  # this test is about the priced verdict
    monkeypatch.setattr(drafter.throughput, "measured_slower", lambda *args: False)
    drafter.overheads.verify.forget(batch_bucket(4))  # earlier tests' verifications at B=3-4
    drafter._hopeless_memo.clear()
    priced_sizes = []

    def none_pays_at_two(batch_size: int, context: float, all_sampled: bool, best_rate: bool = False) -> bool:
        priced_sizes.append(batch_size)
        return batch_size == 2

    monkeypatch.setattr(drafter, "_no_chain_can_pay", none_pays_at_two)
    first_passes = []
    first_pass = drafter._first_pass
    monkeypatch.setattr(drafter, "_first_pass", lambda *args: first_passes.append(args[0].shape[0])
                        or first_pass(*args))
    before = runner.cast_summary()["undrafted_requests"]
    prompts = load_prompts("qa", limit=4)
    assert greedy_token_ids(default_cast_llm, prompts, 16) == greedy_token_ids(vanilla_llm, prompts, 16)
    assert runner.cast_summary()["undrafted_requests"] == before + 4
    assert not first_passes, f"the draft read {sum(first_passes)} prompt rows of an undrafted wave"
    assert 4 in priced_sizes and 2 in priced_sizes
