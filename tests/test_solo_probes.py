"""Judging a request that decodes alone on its own probes (vllm_cast.solo_probes)."""

from __future__ import annotations

from conftest import greedy_token_ids, model_runner

from vllm_cast.prompts import load_prompts
from vllm_cast.solo_probes import (COMPANY_OUTCOMES, LONGEST_REPROBE_WAIT, PROBE_DEPTH_HEADROOM, PROBE_OUTCOMES,
                                   PROBE_STEPS, REEXAMINED_PROBES, REPROBE_WAIT_STEPS, SoloProbes)

PLAIN_RATE = 200.0  # tokens per second of plain decoding at batch size 1 and the request's context


def _probe_and_measure(solo: SoloProbes, req_id: str, tokens_per_step: int, seconds_per_step: float,
                       sampled: bool = False) -> None:
    """Draft a request's probes and record each one's verification step."""
    while solo.wants_probe(req_id, sampled):
        solo.drafted_probe(req_id)
        solo.record(req_id, sampled, tokens_per_step, seconds_per_step, PLAIN_RATE)


def test_a_solo_request_is_judged_on_its_own_probes():
    solo = SoloProbes()
    assert solo.slower("a") is None, "not probed: the pooled verdict rules it"
    assert solo.wants_probe("a", False)
    solo.drafted_probe("a")
    solo.record("a", False, 1, 0.010, PLAIN_RATE)  # 100 tokens/s
    assert solo.slower("a") is False, "one step is no verdict yet"
    assert solo.wants_probe("a", False) == (PROBE_STEPS > 1)
    _probe_and_measure(solo, "a", 1, 0.010)
    assert solo.slower("a"), "100 tokens/s against plain decoding's 200"
    assert not solo.wants_probe("a", False), "a request drafts its probes once"
    _probe_and_measure(solo, "b", 7, 0.020)
    assert solo.slower("b") is False, "350 tokens/s: keeps speculating"
    solo.record("b", False, 1, 0.010, 400.0)
    assert solo.slower("b"), "judged against plain decoding at its latest context: 300 against 400 tokens/s"
    solo.record("c", False, 1, 0.010, PLAIN_RATE)
    assert solo.slower("c") is None, "steps of unprobed requests are not recorded"


def test_probing_stops_in_a_mode_where_no_recent_probe_paid_until_resumed():
    solo = SoloProbes()
    for index in range(PROBE_OUTCOMES - 1):
        _probe_and_measure(solo, f"slow{index}", 1, 0.010, sampled=True)
    _probe_and_measure(solo, "fast", 7, 0.020, sampled=True)
    assert solo.wants_probe("next", True), "one of the recent probed requests paid"
    for index in range(PROBE_OUTCOMES):
        _probe_and_measure(solo, f"later{index}", 1, 0.010, sampled=True)
    assert not solo.wants_probe("next", True), f"none of the last {PROBE_OUTCOMES} probed requests paid"
    assert solo.wants_probe("next", False), "greedy requests are judged apart"
    solo.resume_probing(True)
    for index in range(REEXAMINED_PROBES):
        assert solo.wants_probe(f"again{index}", True), "re-examined on new probes"
        _probe_and_measure(solo, f"again{index}", 1, 0.010, sampled=True)
    assert not solo.wants_probe("next", True), "the re-examination's probes did not pay either"
    solo.resume_probing(True)
    _probe_and_measure(solo, "fast again", 7, 0.020, sampled=True)
    assert solo.wants_probe("next", True), "a re-examination's probe paid: probing goes on"


def test_probes_are_as_deep_as_recent_probes_of_their_mode_were_accepted_plus_headroom():
    solo = SoloProbes()
    assert solo.probe_depth("new", True, 6) == 6, "nothing known yet: as deep as allowed"
    _probe_and_measure(solo, "rejected", 1, 0.010, sampled=True)  # no draft accepted
    assert solo.probe_depth("new", True, 6) == PROBE_DEPTH_HEADROOM
    assert solo.probe_depth("new", False, 6) == 6, "greedy probes are judged apart"
    _probe_and_measure(solo, "two", 3, 0.010, sampled=True)  # two drafts accepted per probe
    assert solo.probe_depth("new", True, 6) == min(6, 2 + PROBE_DEPTH_HEADROOM), "grows with what was accepted"
    assert solo.probe_depth("new", True, 3) == 3, "never past the cap"
    solo.record("two", True, 6, 0.010, PLAIN_RATE)  # a later step, no probe
    assert solo.probe_depth("new", True, 6) == min(6, 2 + PROBE_DEPTH_HEADROOM), "only probe steps count"
    solo.resume_probing(True)
    assert solo.probe_depth("new", True, 6) == 6


def test_a_re_probe_is_as_deep_as_the_requests_own_probes_were_accepted_plus_headroom():
    solo = SoloProbes()
    _probe_and_measure(solo, "paying", 7, 0.020)
    _probe_and_measure(solo, "hard", 2, 0.015)  # one draft accepted per probe: slower
    assert solo.probe_depth("new", False, 6) == 6, "a new request goes by its mode's recent probes"
    assert solo.probe_depth("hard", False, 6) == 1 + PROBE_DEPTH_HEADROOM, "a re-probe goes by its own"
    _wait_until_probed(solo, "hard")
    _probe_and_measure(solo, "hard", 5, 0.015)  # its re-probes accepted four
    assert solo.probe_depth("hard", False, 6) == 6, "grows with what its probes accepted"
    solo.retain(["paying"])
    assert "hard" not in solo.request_runs, "finished requests are forgotten"


def test_a_request_left_alone_is_probed_as_deep_as_its_batched_steps_were_accepted():
    """A request whose drafts were accepted one deep on every step while it decoded in a
    batch is probed 1 + headroom deep once the rest of its batch has finished, where a
    request with no runs of its own goes by its mode's recent probes."""
    solo = SoloProbes()
    _probe_and_measure(solo, "paying", 7, 0.020)
    for _ in range(10):
        solo.note_runs(["straggler", "finished"], [1, 6])
    assert solo.probe_depth("straggler", False, 6) == 1 + PROBE_DEPTH_HEADROOM
    assert solo.probe_depth("new", False, 6) == 6
    solo.retain(["straggler"])
    assert set(solo.request_runs) == {"straggler"}, "requests that never probed are forgotten too"


def test_a_re_probe_goes_by_the_requests_latest_re_probes_not_its_longest_run_ever():
    """A request whose drafts were accepted three deep in a batch, then measured slower
    alone, is re-probed 3 + headroom deep; once those re-probes accepted nothing, its next
    re-probes are headroom deep, and they grow again with what they accept."""
    solo = SoloProbes()
    _probe_and_measure(solo, "paying", 7, 0.020)
    solo.note_runs(["once deep", "partner"], [3, 6])
    _probe_and_measure(solo, "once deep", 1, 0.010)  # alone: nothing accepted, slower
    assert solo.probe_depth("once deep", False, 8) == 3 + PROBE_DEPTH_HEADROOM, "its longest run so far"
    _wait_until_probed(solo, "once deep")
    _probe_and_measure(solo, "once deep", 1, 0.010)
    assert solo.probe_depth("once deep", False, 8) == PROBE_DEPTH_HEADROOM, "its re-probes accepted nothing"
    _wait_until_probed(solo, "once deep")
    _probe_and_measure(solo, "once deep", 2, 0.010)
    assert solo.probe_depth("once deep", False, 8) == 1 + PROBE_DEPTH_HEADROOM
    solo.retain(["paying"])
    assert not solo.reprobing and "once deep" not in solo.request_runs, "finished requests are forgotten"


def test_the_step_verifying_a_last_probe_is_judged_with_its_seconds_so_far():
    """Before its drafting call, the step verifying a request's last probe counts with the
    tokens it emitted and the seconds it has run so far: 1 token in 10 ms, then 1 token in
    at least 8 ms, is slower than plain decoding's 200 tokens/s already."""
    solo = SoloProbes()
    solo.drafted_probe("a")
    assert solo.slower("a", pending=(1, 0.008)) is False, "its first probe alone is no verdict"
    solo.record("a", False, 1, 0.010, PLAIN_RATE)
    solo.drafted_probe("a")
    assert solo.slower("a") is False, "one step is no verdict yet"
    assert solo.slower("a", pending=(1, 0.008)), "2 tokens in at least 18 ms: at most 111 tokens/s"
    assert solo.slower("a", pending=(7, 0.010)) is False, "8 tokens in 20 ms so far: not settled"


def _wait_until_probed(solo: SoloProbes, req_id: str) -> int:
    """Steps the request, measured slower, waits before it wants a probe again."""
    waited = 0
    while not solo.wants_probe(req_id, False):
        assert solo.slower(req_id), "waiting requests are the ones measured slower"
        solo.waited_a_step(req_id)
        waited += 1
        assert waited <= LONGEST_REPROBE_WAIT, "never probed again"
    return waited


def test_a_request_measured_slower_is_probed_again_after_doubling_waits():
    solo = SoloProbes()
    assert not solo.reprobes(False), "no probed request has paid in this mode yet"
    _probe_and_measure(solo, "paying", 7, 0.020)
    assert solo.reprobes(False) and not solo.reprobes(True), "a greedy probed request paid"
    _probe_and_measure(solo, "a", 1, 0.010)
    assert solo.slower("a")
    waits = []
    for _ in range(5):
        waits.append(_wait_until_probed(solo, "a"))
        assert solo.slower("a") is False, "judged on its new probes alone"
        _probe_and_measure(solo, "a", 1, 0.010)
    assert waits == [min(REPROBE_WAIT_STEPS * 2**i, LONGEST_REPROBE_WAIT) for i in range(5)], waits
    _wait_until_probed(solo, "a")
    _probe_and_measure(solo, "a", 7, 0.020)
    assert solo.slower("a") is False, "its new probes paid: it speculates again"


def test_a_step_that_only_drafted_joins_the_next_verified_step():
    """A re-probe's first step drafts without verifying: 1 token in 9 ms, then its probe
    accepted whole, 7 tokens in 11 ms. Recorded as one step, 8 tokens in 20 ms (400/s)."""
    solo = SoloProbes()
    solo.drafted_probe("a")
    solo.record("a", False, 1, 0.009, PLAIN_RATE, verified=False)
    solo.record("a", False, 7, 0.011, PLAIN_RATE)
    solo.drafted_probe("a")
    solo.record("a", False, 1, 0.004, 300.0)
    assert solo.slower("a") is False, "9 tokens in 24 ms: 375 tokens/s, against 300"
    solo.record("a", False, 1, 0.004, 400.0)
    assert solo.slower("a"), "10 tokens in 28 ms: 357 tokens/s, against 400"
    assert solo.probe_depth("new", False, 8) == 6 + PROBE_DEPTH_HEADROOM, "accepted runs count the verified step's own tokens"


def test_finished_requests_are_forgotten():
    solo = SoloProbes()
    _probe_and_measure(solo, "a", 1, 0.010)
    _probe_and_measure(solo, "b", 1, 0.010)
    solo.retain(["b"])
    assert solo.slower("a") is None and solo.slower("b")


def test_each_solo_request_first_verifies_a_deep_chain_probe(vanilla_llm, default_cast_llm, monkeypatch):
    """Real engine, one greedy request at a time: each request's first drafting step is a
    top-1 chain of max_depth nodes (the node budget allows 16; its next probe goes by how
    deep this one was accepted), and output is vanilla's.
    The first prompt was run before: prefix caching holds all of it but one row, and its
    prompt step (one row, like a decode step) is still no probe verification."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    probes: list[tuple[str, int, bool]] = []
    draft_probe = drafter._draft_probe

    def recorded_probe(*args, **kwargs):
        drafts = draft_probe(*args, **kwargs)
        tree = drafter.last_trees[0]
        probes.append((drafter.batch_req_ids[0], len(tree) - 1, tree.is_chain))
        return drafts

    prompts = load_prompts("qa", limit=2) + load_prompts("mt_bench", limit=1)
    greedy_token_ids(default_cast_llm, prompts[:1], 24)
    monkeypatch.setattr(drafter, "_draft_probe", recorded_probe)
    drafter.solo.resume_probing(False)  # also forgets how deep earlier tests' probes were accepted
    # Whether probing pays is measured on the machine: with every earlier probe slower (CI's
    # 2 cores), the outcomes of this test's first requests would stop the last one's probes.
    drafter.solo.paid[False].append(True)
    for prompt in prompts:
        assert greedy_token_ids(default_cast_llm, [prompt], 24) == greedy_token_ids(vanilla_llm, [prompt], 24)
    requests = {req_id for req_id, _, _ in probes}
    assert len(requests) == len(prompts), f"probed {len(requests)} of {len(prompts)} solo requests"
    first_probes = [next(p for p in probes if p[0] == req_id) for req_id in requests]
    assert all(depth == drafter.cast_params.max_depth and chain for _, depth, chain in first_probes), probes
    assert all(chain for _, _, chain in probes), "re-probes are chains too"


def test_solo_requests_are_judged_against_plain_decoding_at_their_own_context(default_cast_llm, monkeypatch):
    """Real engine, greedy: a solo request's speculative steps are compared with plain
    decoding's rate at its own context (the cost table's plain step there, with the measured
    plain overhead), not with plain steps measured on other requests: a summary's long prompt
    makes each step dearer than a short question's."""
    drafter = model_runner(default_cast_llm).drafter
    plain_rates: dict[str, list[float]] = {}
    record = drafter.solo.record

    def recorded(req_id: str, all_sampled: bool, tokens: int, seconds: float, plain_rate: float,
                 verified: bool = True) -> None:
        plain_rates.setdefault(req_id, []).append(plain_rate)
        record(req_id, all_sampled, tokens, seconds, plain_rate, verified)

    monkeypatch.setattr(drafter.solo, "record", recorded)
    drafter.solo.paid[False].append(True)  # an earlier probed request paid: these are probed
    for prompt in load_prompts("qa", limit=1) + load_prompts("sum", limit=1):
        greedy_token_ids(default_cast_llm, [prompt], 128)  # enough tokens to repay the summary's prompt pass
    assert len(plain_rates) == 2, f"speculative steps of {len(plain_rates)} of 2 solo requests recorded"
    short_prompt, long_prompt = plain_rates.values()
    assert max(long_prompt) < min(short_prompt), plain_rates


def test_lone_arrivals_put_drafting_off_while_bursts_follow_them():
    solo = SoloProbes()
    for _ in range(COMPANY_OUTCOMES - 1):
        solo.record_arrival(joined=True)
    assert not solo.expects_company(), f"fewer than {COMPANY_OUTCOMES} lone arrivals seen"
    solo.record_arrival(joined=True)
    assert solo.expects_company()
    solo.record_arrival(joined=False)
    assert not solo.expects_company(), "one lone arrival stayed alone"


def test_a_solo_request_measured_slower_is_probed_again_with_vanilla_output(vanilla_llm, default_cast_llm,
                                                                            monkeypatch):
    """Real engine, greedy: a request decoding alone whose probes measure slower (plain
    decoding's rate pretended 10^9 tokens/s) waits, its draft model idle, and is probed
    again after REPROBE_WAIT_STEPS steps, then twice as many; output is vanilla's. The
    step verifying its last probe drafts no tree: it is judged before its drafting call."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    probe_steps: list[int] = []
    tree_steps: list[int] = []
    draft_probe, draft_trees = drafter._draft_probe, drafter._draft_trees

    def recorded_probe(*args, **kwargs):
        probe_steps.append(int(runner.input_batch.num_computed_tokens_cpu[0]))
        return draft_probe(*args, **kwargs)

    def recorded_trees(*args, **kwargs):
        tree_steps.append(int(runner.input_batch.num_computed_tokens_cpu[0]))
        return draft_trees(*args, **kwargs)

    prompt = load_prompts("qa", limit=1)
    drafter.solo.resume_probing(False)
    drafter.solo.paid[False].append(True)  # an earlier probed request paid: slower ones are probed again
    monkeypatch.setattr(drafter, "_draft_probe", recorded_probe)
    monkeypatch.setattr(drafter, "_draft_trees", recorded_trees)
    monkeypatch.setattr(drafter.overheads, "plain_step_seconds", lambda *args: 1e-9)
    skipped_before = drafter.skipped_steps
    tokens = 3 * REPROBE_WAIT_STEPS + 4 * (PROBE_STEPS + 1) * drafter.cast_params.max_depth
    assert greedy_token_ids(default_cast_llm, prompt, tokens) == greedy_token_ids(vanilla_llm, prompt, tokens)
    assert len(probe_steps) >= 3 * PROBE_STEPS, f"probed at {probe_steps}: not probed again twice"
    assert drafter.skipped_steps - skipped_before >= 3 * REPROBE_WAIT_STEPS, "waits skipped the draft model"
    assert not runner._undrafted, "a request that waits for a re-probe is not undrafted"
    assert not tree_steps, f"trees drafted at {tree_steps} after probes measured slower"


def test_a_second_probe_goes_by_how_deep_the_first_was_accepted(vanilla_llm, default_cast_llm, monkeypatch):
    """Real engine, greedy, requests decoding alone: a probe drafted on the step that verified
    the request's previous probe is at most that probe's accepted run plus
    PROBE_DEPTH_HEADROOM deep (noted before the drafting call, not once the step ended);
    output is vanilla's."""
    runner = model_runner(default_cast_llm)
    drafter = runner.drafter
    probes: list[tuple[int | None, int]] = []  # (run this step verified or None, probe depth)
    draft_probe = drafter._draft_probe

    def recorded_probe(*args, **kwargs):
        verified = drafter.solo_step_so_far
        widths = draft_probe(*args, **kwargs)
        probes.append((None if verified is None else verified[0] - 1, len(widths) + 1))
        return widths

    monkeypatch.setattr(drafter, "_draft_probe", recorded_probe)
    prompts = [prompt for task in ("mt_bench", "gsm8k", "alpaca", "qa") for prompt in load_prompts(task, limit=2)]
    for prompt in prompts:
        drafter.solo.accepted_runs[False].clear()  # every first probe as deep as allowed
        drafter.solo.paid[False].clear()  # and every request probed
        assert greedy_token_ids(default_cast_llm, [prompt], 24) == greedy_token_ids(vanilla_llm, [prompt], 24)
    deepest = min(drafter.cast_params.max_depth, drafter.max_nodes)
    after_short_runs = [(run, depth) for run, depth in probes if run is not None and run + PROBE_DEPTH_HEADROOM < deepest]
    assert after_short_runs, f"no probe followed one accepted short of {deepest - PROBE_DEPTH_HEADROOM}: {probes}"
    assert all(depth <= run + PROBE_DEPTH_HEADROOM for run, depth in after_short_runs), probes
