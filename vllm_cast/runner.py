"""CAST inside vLLM's V1 model runner: tree positions and masks for verification, tree
acceptance, KV compaction of the accepted path, and the tree proposer.

Per step, for each request whose scheduled draft tokens are a prefix of the tree CAST
proposed for it last step: its verification rows get depth-based RoPE positions and an
ancestor mask (slots stay sequential); after the forward, tree acceptance picks the
longest matching path; the accepted nodes' target K/V (and the rows the drafter reads:
token ids, hidden states) move to contiguous positions so the rest of vLLM sees an
ordinary chain of accepted tokens. Requests without a stored tree verify as chains.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from vllm.config import CompilationMode
from vllm.model_executor.models.interfaces import EagleModelMixin
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker import gpu_model_runner
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_cast.arrivals import ArrivalForecast
from vllm_cast.attention.cpu_kv_layout import move_tokens
from vllm_cast.attention.tree_plan import TreePlan, TreeRequest, active_plan
from vllm_cast.cost_model import StepCosts, profile_table
from vllm_cast.cost_tables import cost_source, resolve_table, table_key
from vllm_cast.draft_delivery import with_drafts
from vllm_cast.engine_profiler import ForwardTimers, grids
from vllm_cast.proposer import CastProposer, CostSource
from vllm_cast.stats import CastStats
from vllm_cast.step_clock import StepClock
from vllm_cast.step_overheads import AFTER_PROMPT_STEPS
from vllm_cast.tree import DraftTree, ancestor_mask, depths
from vllm_cast.tree_builder import StepDecision
from vllm_cast.tree_sampler import GREEDY_EPS, TreeVerdicts, needs_logits_processing, verify_trees


UNDRAFTED_SAMPLE_EVERY = 4
"""Of the steps that repeat an undrafted batch's plain decoding (``_repeats_undrafted_step``),
one in this many is measured (``_time_step``); the others skip CAST's bookkeeping."""


@contextlib.contextmanager
def _eagle_proposer_is_cast() -> Iterator[None]:
    """Make vLLM's runner construct :class:`CastProposer` where it builds EAGLE's."""
    original = gpu_model_runner.EagleProposer
    gpu_model_runner.EagleProposer = CastProposer
    try:
        yield
    finally:
        gpu_model_runner.EagleProposer = original


class CastRunnerMixin:
    """Overrides of vLLM's V1 ``GPUModelRunner`` methods for CAST (see module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        with _eagle_proposer_is_cast():
            super().__init__(*args, **kwargs)
        self.cast_trees: dict[str, DraftTree] = {}
        self._step_trees: list[DraftTree | None] = []
        self._plain: list[bool] = []
        self._sampled = torch.zeros(0, dtype=torch.bool)
        self._all_sampled = False
        self._flags_by_request: dict[str, tuple[bool, bool]] = {}
        self._undrafted: set[str] = set()
        """Requests whose rows the draft stopped seeing (dropped while speculation was
        hopeless): they are never given drafts nor feed the calibrator."""
        self._undrafted_total = 0
        self._drafted_rows = np.zeros(0, dtype=bool)
        """Per batch row this step: not undrafted (bool ``[B]``, set by ``_prepare_inputs``
        after the hopeless verdict; read by drafting)."""
        self._keeps_rows = False
        """This step skips the draft model and keeps its drafted rows for the next drafting
        step (decided by ``_prepare_inputs``, see ``_skips_drafting``)."""
        self._undrafted_run = False
        """The last step decoded a batch of undrafted requests only as vLLM's plain decoding,
        with nothing arriving (set by ``_prepare_inputs``)."""
        self._undrafted_repeat = False
        """This step repeats that step's batch (see ``_repeats_undrafted_step``)."""
        self._run_repeats = 0
        """Steps that repeated the undrafted batch since ``_undrafted_run`` was last set (one in
        ``UNDRAFTED_SAMPLE_EVERY`` is measured)."""
        self._arrivals = ArrivalForecast()
        self._arriving = False
        """Requests are arriving this step: their prompts are not fully computed (see
        vllm_cast.arrivals)."""
        self._lone_arrival = False
        """This step's batch is one request, new this step (vllm_cast.solo_probes)."""
        self._prompt_deferred = False
        """This step put a lone arrival's drafting off (its rows are in the dormancy stash)."""
        self._drafts_deferred_prompt = False
        """The previous step put a lone arrival's drafting off: this step's drafting, if
        any, replays its prompt rows (timed as a prompt step's drafting)."""
        self._verify_plan: TreePlan | None = None
        self._verdicts: TreeVerdicts | None = None
        self.cast_stats = CastStats()
        self._step_clock = StepClock()
        self._drafting_seconds = 0.0
        self._emitted_tokens = 0
        self._verified_drafts = False
        self._drafted_last_step = False
        """The previous step ran the draft model or verified drafts (see ``_record_overheads``)."""
        self._decode_only = False
        self._decode_steps_in_a_row = 0
        """Decode-only steps since the last step with prompt rows, this one included."""
        self._spec_tokens = 0
        self._step_tokens = 0
        self._aux_holder = None
        self._aux_layers: tuple[int, ...] | None = None
        """The target's module collecting EAGLE-3's auxiliary hidden states and its layers
        (found when first hidden; see ``_collect_aux_hidden_states``)."""
        self._seen_forward_shapes: set[tuple[str, int]] = set()
        """(model, token rows) of every forward run so far (see ``_first_run_of_a_shape``)."""
        self._drafting_decision: StepDecision | None = None
        """The last step's drafting decision, whose trees this step verifies (None: it drafted
        nothing); its prices of that verification are compared with this step's wall time."""
        self._root_candidates: tuple[list[str], np.ndarray, np.ndarray] | None = None
        """Last drafting step's request ids and their top-K first draft tokens and
        probabilities ``[B, K]`` (the calibrator's first-layer outcomes)."""
        if self.sampler.logprobs_mode not in ("raw_logprobs", "raw_logits"):
            raise ValueError(f"CAST supports logprobs_mode raw_logprobs or raw_logits, not {self.sampler.logprobs_mode!r}")

    def set_cost_source(self, source: CostSource) -> None:
        self.drafter.cost_source = source

    def cast_summary(self) -> dict[str, float]:
        """CAST's decision statistics plus the steps the draft model was skipped."""
        return {**self.cast_stats.summary(), "dormant_steps": self.drafter.skipped_steps,
                "undrafted_requests": self._undrafted_total,
                **self.drafter.overheads.summary(), **self.drafter.throughput.summary()}

    def cast_prepare_costs(self) -> None:
        """Load or profile the cost table (worker start-up, after the KV cache exists)."""
        params = self.drafter.cast_params
        spec = self.vllm_config.speculative_config
        key = table_key(self.model_config.model, spec.draft_model_config.model, self.model_config.dtype, self.device)
        max_tokens = max(self.drafter.max_nodes + 1, params.node_top_k)
        timers = ForwardTimers(self)
        batches, contexts, tokens = grids(self.scheduler_config.max_num_seqs, self.max_model_len, max_tokens,
                                          self.kv_cache_config.num_blocks - 1, timers.block_size)
        table = resolve_table(params, key, lambda: profile_table(key, timers.target, timers.draft, batches, contexts,
                                                                 tokens, timers.chain_target, timers.chain_draft),
                             max_tokens, max_batch=batches[-1])
        self.set_cost_source(cost_source(table, max_tokens))

    # -- step timing (measured against the cost table's prediction) ------------------------
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._step_clock.start()
        self._step_tokens = scheduler_output.total_num_scheduled_tokens
        self._spec_tokens = sum(len(drafts) for drafts in scheduler_output.scheduled_spec_decode_tokens.values())
        # One row per request plus its drafts, and no request starting (a new or resumed
        # request's prompt step schedules one row when prefix caching holds the rest).
        self._decode_only = (scheduler_output.total_num_scheduled_tokens
                             == len(scheduler_output.num_scheduled_tokens) + self._spec_tokens
                             and not scheduler_output.scheduled_new_reqs
                             and not scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        self._decode_steps_in_a_row = self._decode_steps_in_a_row + 1 if self._decode_only else 0
        self._keeps_rows = False  # set by _prepare_inputs, which a step without tokens skips
        self._undrafted_repeat = self._repeats_undrafted_step(scheduler_output)
        self.speculative_config = self.vllm_config.speculative_config  # _prepare_inputs may hide it
        return super().execute_model(scheduler_output, intermediate_tensors)

    def _repeats_undrafted_step(self, scheduler_output) -> bool:
        """Whether this step decodes the same undrafted requests as the last step did (see
        ``_undrafted_run``), one token each: none new, resumed, finished or left unscheduled.
        Then it runs as vLLM's plain decoding with none of CAST's bookkeeping but the step
        clock, and one in ``UNDRAFTED_SAMPLE_EVERY`` such steps is measured. At T=1 B=1 on
        the ``ci`` pair (every request undrafted, one process, 6144 steps each) CAST's median
        step took 2.41 ms against vanilla's 2.28 and 2.33, and 2.34 with all of its
        bookkeeping stubbed out; with this path 2.78 against 2.80 without it (vanilla 2.74
        and 2.70, 7680 steps each, a slower hour of the machine)."""
        return (self._undrafted_run and self._decode_only and not self._spec_tokens
                and not scheduler_output.finished_req_ids
                and len(scheduler_output.num_scheduled_tokens) == self.input_batch.num_reqs)

    def sample_tokens(self, grammar_output):
        if self._undrafted_repeat:
            return self._sample_undrafted_repeat(grammar_output)
        verified = self._drafting_decision
        if self._keeps_rows:
            started = time.perf_counter()
            self._remember_rows(self.execute_model_state.aux_hidden_states)
            self._drafting_seconds = time.perf_counter() - started
        output = self._vllm_sample_tokens(grammar_output)
        self._time_step(self._step_clock.stop(), verified)
        decision = self._drafting_decision = self.drafter.last_decision
        self._drafted_last_step = self._verified_drafts or decision is not None
        return with_drafts(output, self.take_draft_token_ids())  # see vllm_cast.draft_delivery

    def _vllm_sample_tokens(self, grammar_output):
        """vLLM's ``sample_tokens``, with the speculative config restored after it (a plain
        step's ``_prepare_inputs`` hides it)."""
        try:
            return super().sample_tokens(grammar_output)
        finally:
            self.speculative_config = self.vllm_config.speculative_config

    def _sample_undrafted_repeat(self, grammar_output):
        """``sample_tokens`` of a step repeating an undrafted batch (``_repeats_undrafted_step``):
        vLLM's sampling; measured once every ``UNDRAFTED_SAMPLE_EVERY`` such steps of a run,
        that sample standing for all of them where plain steps are counted
        (``MeasuredThroughput.record``; fewer steps at the end of a run are not counted).
        Every such step is a step of its requests' open cohorts (vllm_cast.cohorts)."""
        output = self._vllm_sample_tokens(grammar_output)
        measured = self._step_clock.stop()  # every step: the next one's loop gap starts here
        self._run_repeats += 1
        if self._run_repeats % UNDRAFTED_SAMPLE_EVERY == 0:
            self._time_step(measured, None, plain_steps=UNDRAFTED_SAMPLE_EVERY)
        elif self.drafter.cost_source is not None and self.drafter.throughput.cohorts.lives:
            batch = self.input_batch.num_reqs
            self._record_cohort_step(batch, None, measured, self._plain_costs(batch))
        return with_drafts(output, None)

    def _time_step(self, measured: float, verified: StepDecision | None, plain_steps: int = 1) -> None:
        """Compare a step's wall time (``measured``: the runner's share and the engine
        loop's gap before it, vllm_cast.step_clock) with the prices of the last step's
        drafting decision (``verified``; None: it drafted nothing) and this step's: for the
        stats (speculative steps) and, for decode-only steps past the first
        ``AFTER_PROMPT_STEPS`` after a step with prompt rows, the drafter's measured
        overheads (``_record_overheads``).
        Every decode-only step is a throughput sample and a step of its requests' cohorts
        unless it ran a shape for the first time: the set-up is paid once per shape, not per
        step (greedy, grid order: MT-Bench's first B=4 wave ran three new shapes, 52 ms of set-up
        against ~0.23 s of decoding; charged them, first B=4 cohorts read 0.67-0.83x and one
        decided alone that the next four tasks stayed plain; uncharged, they read 1.24x and
        1.45x). On other steps, and on one drafting a lone arrival's deferred prompt rows, the
        drafting call is charged to speculation (vllm_cast.throughput: prompts' lengths vary,
        so set-up of new shapes is a real cost of drafting them). ``plain_steps``: the plain
        steps of its batch this one stands for (``_sample_undrafted_repeat``)."""
        decision = self.drafter.last_decision
        predicted_verify = None if verified is None else verified.predicted_verify_seconds
        if decision is not None and verified is not None:
            self.cast_stats.record_step_time(measured, predicted_verify + decision.predicted_draft_seconds,
                                             verified.priced_verify_seconds + decision.priced_draft_seconds)
        if self.drafter.cost_source is None:
            return
        batch = self.input_batch.num_reqs
        plain_costs = self._plain_costs(batch)
        decode_sample = self._decode_only and not (self._drafts_deferred_prompt and decision is not None)
        first_run = decode_sample and self._first_run_of_a_shape(decision)
        if not first_run:
            self._record_cohort_step(batch, decision, measured, plain_costs)
        if not decode_sample:
            if decision is not None:
                self.drafter.throughput.record_prompt_drafting(batch, self._all_sampled, self._drafting_seconds,
                                                               max(self._emitted_tokens - batch, 0))
            return
        if first_run:
            return
        if self._decode_steps_in_a_row > AFTER_PROMPT_STEPS:
            self._record_overheads(batch, decision, measured, predicted_verify, plain_costs)
        speculative = self._verified_drafts or decision is not None
        throughput = self.drafter.throughput
        if throughput.record(batch, self._all_sampled, speculative, self._emitted_tokens, measured, plain_steps):
            self.drafter.solo.resume_probing(self._all_sampled)
            self.drafter.dormancy.restart()
        if speculative and batch == 1:
            plain_rate = 1.0 / self.drafter.overheads.plain_step_seconds(1, plain_costs())
            self.drafter.solo.record(self.input_batch.req_ids[0], self._all_sampled, self._emitted_tokens, measured,
                                     plain_rate, self._verified_drafts)

    def _plain_costs(self, batch: int) -> Callable[[], StepCosts]:
        """The cost table's costs at this step's ``batch`` size and mean context, looked up
        on the first call only (once a step, when needed: functools.cache cost 14 us)."""
        table: list[StepCosts] = []

        def plain_costs() -> StepCosts:
            if not table:
                table.append(self.drafter.cost_source(batch, self._mean_context(batch)))
            return table[0]
        return plain_costs

    def _record_overheads(self, batch: int, decision: StepDecision | None, measured: float,
                          predicted_verify: float | None, plain_costs: Callable[[], StepCosts]) -> None:
        """This decode step's unpriced seconds (vllm_cast.step_overheads): outside its drafting
        call (or the copying of rows a dormant step keeps, which plain decoding does not pay)
        against its target forward (``predicted_verify``; None: a plain step's; a plain step
        only after another, see ``StepOverheads.plain``), and the
        drafting call against its draft passes (not for probes replaying dormant rows)."""
        drafting = self._drafting_seconds if decision is not None or self._keeps_rows else 0.0
        if self._verified_drafts or not self._drafted_last_step:
            predicted = plain_costs().plain_step_seconds if predicted_verify is None else predicted_verify
            self.drafter.overheads.record_step(batch, measured - drafting, predicted, self._verified_drafts)
        if decision is not None and not decision.replayed:
            self.drafter.overheads.record_drafting(batch, drafting, decision.predicted_first_pass_seconds,
                                                   decision.measured_layer_seconds, decision.predicted_layer_seconds,
                                                   len(decision.draft_forward_tokens) - 1)

    def _record_cohort_step(self, batch: int, decision: StepDecision | None, measured: float,
                            plain_costs: Callable[[], StepCosts]) -> None:
        """This step in the cohort ledger (vllm_cast.cohorts), while it has a drafted request:
        decode-only steps with their wall time, others with their drafting time; each
        request's tokens against plain decoding's step at this batch size and context (the
        cost table's, with the measured plain overhead: plain steps measured at other
        contexts, long before, read sum prompts' cohorts 10% slower than their wall time;
        ``plain_costs`` gives the table's costs at this batch size and context, computed once
        a step)."""
        cohorts = self.drafter.throughput.cohorts
        joining = self._drafted_rows.tolist()  # in Python: numpy's any() is slow right after a forward
        if not (cohorts.lives or any(joining)):
            return
        plain_step = self.drafter.overheads.plain_step_seconds(batch, plain_costs())
        req_ids = self.input_batch.req_ids[:batch]
        emitted = self._emitted_by_request(batch)
        if self._decode_only:
            cohorts.record_step(req_ids, joining, emitted, measured, plain_step,
                                self._verified_drafts or decision is not None, self._all_sampled)
        else:
            drafting = 0.0 if decision is None else self._drafting_seconds
            cohorts.record_prompt_step(req_ids, joining, emitted, drafting, plain_step, self._all_sampled)

    def _emitted_by_request(self, batch: int) -> list[int]:
        """Tokens each of the first ``batch`` requests emitted this step (one without drafts)."""
        return [1] * batch if self._verdicts is None else [len(tokens) for tokens in self._verdicts.tokens]

    def _tokens_left(self, req_ids: list[str]) -> list[int] | None:
        """Per batch row: the tokens the request may still emit after this step, its
        ``max_tokens`` less the tokens it has with this step's (0: this step ends it;
        ``sys.maxsize``: no ``max_tokens``). Its next step's drafts are one fewer, for the
        bonus token (a longer tree is drafted and verified for nothing: at the end of a
        20-token greedy request, a 6-deep chain verified where one token was left). None
        under async scheduling, where the requests' output counts lag the sampled tokens."""
        if self.use_async_scheduling:
            return None
        left = []
        for req_id, emitted in zip(req_ids, self._emitted_by_request(len(req_ids))):
            state = self.requests[req_id]
            max_tokens = None if state.sampling_params is None else state.sampling_params.max_tokens
            left.append(sys.maxsize if max_tokens is None
                        else max(max_tokens - len(state.output_token_ids) - emitted, 0))
        return left

    def _first_run_of_a_shape(self, decision: StepDecision | None) -> bool:
        """Whether this decode step ran a forward over a token count its model had not run
        before: kernels are set up per shape on first use (oneDNN primitives on CPU: several
        ms), so the step is no sample of what its shapes cost. Notes the shapes."""
        shapes = {("target", self._step_tokens)}
        if decision is not None:
            shapes.update(("draft", tokens) for tokens in decision.draft_forward_tokens)
        first_run = not shapes <= self._seen_forward_shapes
        self._seen_forward_shapes |= shapes
        return first_run

    def _mean_context(self, batch: int) -> float:
        """Tokens already computed per request, averaged over the first ``batch`` rows."""
        # In Python: right after a forward, numpy's reduction machinery took 13 us (T=1 B=8).
        return sum(self.input_batch.num_computed_tokens_cpu[:batch].tolist()) / batch

    # -- verification inputs -------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        if self._undrafted_repeat:  # the last step's batch and verdict hold (see _repeats_undrafted_step)
            self.speculative_config = None  # back in sample_tokens
            self.drafter.skipped_steps += 1
            self._drafts_deferred_prompt = False
            result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
            self._plan_tree_verification(scheduler_output, num_scheduled_tokens)  # no drafts: no trees
            return result
        self._plain, self._sampled = self._request_flags()  # used by acceptance and drafting this step
        if self._lone_arrival:
            self.drafter.solo.record_arrival(joined=self.input_batch.num_reqs > 1)
        self._lone_arrival = self.input_batch.num_reqs == 1 and len(scheduler_output.scheduled_new_reqs) == 1
        self._drafts_deferred_prompt, self._prompt_deferred = self._prompt_deferred, False
        if self._undrafted:
            self._undrafted.intersection_update(self._flags_by_request)
        # A step whose requests are all undrafted drafts nothing. Without draft tokens to
        # verify it runs as vLLM's plain decoding, with no speculative path at all (no
        # spec-decode metadata, no drafter call), under synchronous scheduling (vLLM's async
        # path hands sampled tokens to the drafter's next step).
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        self._arriving = self._arrivals.step(
            (request.req_id for request in scheduler_output.scheduled_new_reqs), len(req_ids),
            self.input_batch.req_id_to_index, self.input_batch.num_computed_tokens_cpu, self.input_batch.num_prompt_tokens)
        self.drafter.prompts_paid = not self._arriving
        if scheduler_output.scheduled_new_reqs:
            self._undraft_unpayable_prompts(scheduler_output.scheduled_new_reqs, len(req_ids))
        drafted = [req_id not in self._undrafted for req_id in req_ids] if self._undrafted else [True] * len(req_ids)
        self._drafted_rows = np.array(drafted, dtype=bool)
        any_drafted = any(drafted)
        speculative = True
        if not any_drafted or self._undraft_if_hopeless(req_ids, self._drafted_rows, num_scheduled_tokens):
            # Every request is undrafted now: no remembered row (of these requests, or of
            # requests that finished while dormant) will be replayed.
            self.drafter.dormancy.forget()
            self._drafted_rows[:] = False
            if self._spec_tokens == 0 and not self.use_async_scheduling:
                speculative = False
                self.speculative_config = None  # back in sample_tokens
                self._root_candidates = None
                self.drafter.skipped_steps += 1
        elif self._spec_tokens == 0 and self._skips_drafting(req_ids, num_scheduled_tokens):
            self._keeps_rows = True
            self.drafter.skipped_steps += 1
            if self._root_candidates is None and not self.use_async_scheduling:
                self.speculative_config = None  # nothing to verify or learn: vLLM's plain path
        self._undrafted_run = not speculative and not self._arriving and not self._lone_arrival
        self._run_repeats = 0
        self._collect_aux_hidden_states(speculative)
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._plan_tree_verification(scheduler_output, num_scheduled_tokens)
        return result

    def _collect_aux_hidden_states(self, collect: bool) -> None:
        """Whether the target forwards from this step on collect EAGLE-3's auxiliary hidden
        states (the draft's input: one ``[tokens, H]`` add per collected layer, ~17 us of a
        3.1 ms T=1 B=8 step); not on steps that draft nothing and verify nothing. Eager
        models only: a compiled forward keeps the outputs it was traced with."""
        if collect == self.use_aux_hidden_state_outputs or self.compilation_config.mode != CompilationMode.NONE:
            return
        if self._aux_layers is None:
            self._aux_holder = next(m for m in self.get_model().modules() if isinstance(m, EagleModelMixin))
            self._aux_layers = self._aux_holder.aux_hidden_state_layers
        self.use_aux_hidden_state_outputs = collect
        # Past nn.Module.__setattr__ (its type checks cost more than the adds saved).
        object.__setattr__(self._aux_holder, "aux_hidden_state_layers", self._aux_layers if collect else ())

    def _undraft_if_hopeless(self, req_ids: list[str], drafted: np.ndarray, num_scheduled_tokens: np.ndarray) -> bool:
        """Before every step: while no chain could pay for itself at this batch size (see
        below for arriving requests; ``speculation_hopeless``) the ``drafted`` requests (bool ``[B]``: not undrafted yet,
        at least one) become undrafted: they never speculate again and the draft model never
        reads their rows again (drafts scheduled already are still verified; requests
        arriving once speculation may pay again are drafted, and the rows of undrafted ones
        are kept out of their first pass: vllm_cast.first_pass_rows). Requests whose prompts
        the draft has read are judged with their prompt passes paid (``prompts_paid`` of
        ``speculation_hopeless``): when only the arriving requests' passes would not be repaid,
        only they are undrafted (their rows cleared in ``drafted``). Returns whether every
        request of the batch is undrafted now."""
        # Context of the next steps: what is in the KV cache once this step's rows are (a new prompt's length).
        # In Python: numpy's first calls right after a forward are slow (29 us here at B=4).
        context = (sum(self.input_batch.num_computed_tokens_cpu[: len(req_ids)].tolist())
                   + sum(num_scheduled_tokens.tolist())) / len(req_ids)
        self.drafter.batch_req_ids = req_ids
        # A lone arrival whose rows the stash can hold is judged once company comes, if it
        # does (vllm_cast.solo_probes); other arriving requests at the batch size they will
        # decode at (vllm_cast.arrivals).
        deferrable = self._lone_arrival and self.drafter.dormancy.fits(int(num_scheduled_tokens[0]))
        batch_size = len(req_ids) if deferrable else self._arrivals.judged_batch_size(len(req_ids), self._arriving)
        hopeless = self.drafter.speculation_hopeless
        if hopeless(batch_size, context, self._all_sampled, prompts_paid=True):
            self._undraft([req_id for req_id, row in zip(req_ids, drafted.tolist()) if row])
            return True
        if not (self._arriving and hopeless(batch_size, context, self._all_sampled)):
            return False
        # Only the arriving requests' prompt passes would not be repaid: they alone are undrafted.
        arriving = [row and req_id in self._arrivals.arriving for req_id, row in zip(req_ids, drafted.tolist())]
        self._undraft([req_id for req_id, undraft in zip(req_ids, arriving) if undraft])
        drafted[arriving] = False
        return not drafted.any()

    def _plan_tree_verification(self, scheduler_output, num_scheduled_tokens: np.ndarray) -> None:
        """Depth positions and ancestor masks for requests verifying a stored tree."""
        self._step_trees = [None] * self.input_batch.num_reqs
        starts = self.query_start_loc.np
        requests = []
        for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            index = self.input_batch.req_id_to_index[req_id]
            tree = self.cast_trees.get(req_id)
            count = len(drafts)
            if tree is None or count == 0 or num_scheduled_tokens[index] != count + 1:
                continue
            if tree.draft_tokens[:count] != list(drafts):
                continue
            self._step_trees[index] = tree = tree.prefix(count + 1)
            if tree.is_chain:
                continue  # vLLM's causal path is already right
            parents = tree.parents
            context = int(self.input_batch.num_computed_tokens_cpu[index])
            start = int(starts[index])
            self.positions[start : start + count + 1] = (context + depths(parents)).to(self.positions)
            requests.append(TreeRequest(index, context, ancestor_mask(parents)))
        self._verify_plan = TreePlan(tuple(requests)) if requests else None

    def _build_attention_metadata(self, *args, **kwargs):
        if self._verify_plan is None:
            return super()._build_attention_metadata(*args, **kwargs)
        with active_plan(self._verify_plan):
            return super()._build_attention_metadata(*args, **kwargs)

    # -- acceptance --------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: SpecDecodeMetadata | None):
        self._verdicts = None
        self.cast_trees = {}  # consumed by this step's _prepare_inputs; refilled by drafting
        self.drafter.last_decision = None
        self._emitted_tokens, self._verified_drafts = self.input_batch.num_reqs, False
        if spec_decode_metadata is None or (self._root_candidates is None
                                            and not any(spec_decode_metadata.num_draft_tokens)):
            return super()._sample(logits, None)  # nothing drafted, nothing to learn: vLLM's sampler
        self.input_batch.update_async_output_token_ids()
        parents = [None if tree is None or tree.is_chain else tree.parent_list() for tree in self._step_trees]
        output, self._verdicts = verify_trees(
            logits, spec_decode_metadata, parents, self._plain,
            self.input_batch.sampling_metadata, self.sampler)
        self._emitted_tokens = sum(len(tokens) for tokens in self._verdicts.tokens)
        self._verified_drafts = any(spec_decode_metadata.num_draft_tokens)
        self._compact_accepted_kv()
        self._record_acceptance()
        self.cast_stats.record_verification(list(spec_decode_metadata.num_draft_tokens),
                                            [len(path) for path in self._verdicts.paths])
        return output

    def _record_acceptance(self) -> None:
        """Feed the drafter's calibrator with this step's outcomes, each with its request:
        every first-layer candidate drafted last step (accepted iff it is the token the
        target drew after the root) and every deeper verified node whose parent was accepted.
        In plain Python, like the calibrator's ``record`` (a few outcomes per request)."""
        if self._root_candidates is None:
            return
        drafted_ids, root_tokens, root_probs = self._root_candidates
        drafted_row = {req_id: row for row, req_id in enumerate(drafted_ids)}
        current_ids = self.input_batch.req_ids[: len(self._verdicts.tokens)]
        rows = [(index, drafted_row[req_id]) for index, req_id in enumerate(current_ids)
                if req_id in drafted_row and req_id not in self._undrafted and not self.discard_request_mask.np[index]]
        if not rows:
            return
        if len(current_ids) > 1:  # a solo request's probes note their own runs (vllm_cast.solo_probes)
            self.drafter.solo.note_runs([current_ids[index] for index, _ in rows],
                                        [len(self._verdicts.paths[index]) for index, _ in rows])
        candidate_tokens, candidate_probs, sampled = root_tokens.tolist(), root_probs.tolist(), self._sampled.tolist()
        candidates = len(candidate_tokens[0])
        probs, ranks, accepted, modes, owners, deep = [], [], [], [], [], []
        for index, row in rows:
            first_token = self._verdicts.tokens[index][0]
            probs += candidate_probs[row]
            ranks += range(candidates)
            accepted += [token == first_token for token in candidate_tokens[row]]
            modes += [sampled[index]] * candidates
            owners += [index] * candidates
            deep += [False] * candidates
            tree = self._step_trees[index]
            nodes = None if tree is None or len(tree) <= 2 else tree.calibration_nodes()
            if nodes is None:
                continue  # no node below the first layer
            on_path = {0, *self._verdicts.paths[index]}
            for node, (parent, prob, rank) in enumerate(zip(*nodes)):
                if parent > 0 and parent in on_path:
                    probs.append(prob)
                    ranks.append(rank)
                    accepted.append(node in on_path)
                    modes.append(sampled[index])
                    owners.append(index)
                    deep.append(True)
        self.drafter.calibrator.record(probs, ranks, accepted, modes, owners, owner_ids=current_ids, deep=deep)

    def _request_flags(self) -> tuple[list[bool], torch.Tensor]:
        """Per batch row: may this request take drafts (see tree_sampler), and does it
        verify by sampling (``[B]`` bool; else greedy)? Memoised per request id; also sets
        ``_all_sampled`` and, when the batch changed, drops the calibrator's records of the
        requests that left it."""
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        if list(self._flags_by_request) == req_ids:
            return self._plain, self._sampled  # same batch as last step
        known = self._flags_by_request

        def flags(params) -> tuple[bool, bool]:
            return not needs_logits_processing(params), params.temperature >= GREEDY_EPS

        self._flags_by_request = {
            req_id: known[req_id] if req_id in known else flags(self.requests[req_id].sampling_params)
            for req_id in req_ids}
        self.drafter.retain(req_ids)
        values = list(self._flags_by_request.values())
        self._all_sampled = all(sampled for _, sampled in values)
        return [plain for plain, _ in values], torch.tensor([sampled for _, sampled in values], dtype=torch.bool)

    def _moved_paths(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(batch row, context length, accepted tree nodes) for paths that are not
        already contiguous."""
        for index, path in enumerate(self._verdicts.paths if self._verdicts else []):
            if path and path != list(range(1, len(path) + 1)):
                yield index, int(self.input_batch.num_computed_tokens_cpu[index]), torch.tensor(path)

    def _target_kv_caches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(KV cache group, cache tensor) of every target attention layer (each tensor once)."""
        draft_layers = set(self.drafter._draft_attn_layer_names)
        seen: set[int] = set()
        for group_id, group in enumerate(self.kv_cache_config.kv_cache_groups):
            for name in group.layer_names:
                context = self.compilation_config.static_forward_context.get(name)
                cache = getattr(context, "kv_cache", None)
                if name in draft_layers or not isinstance(cache, torch.Tensor) or cache.data_ptr() in seen:
                    continue
                seen.add(cache.data_ptr())
                yield group_id, cache

    def _compact_accepted_kv(self) -> None:
        """Move each accepted path's target K/V to the slots right after its root."""
        moves = list(self._moved_paths())
        if not moves:
            return
        for group_id, cache in self._target_kv_caches():
            table = self.input_batch.block_table.block_tables[group_id]
            block_size = table.block_size
            sources, targets = [], []
            for index, context, path in moves:
                blocks = table.block_table.cpu[index]
                for logical, collection in ((context + path, sources),
                                            (context + torch.arange(1, len(path) + 1), targets)):
                    collection.append(blocks[logical // block_size].long() * block_size + logical % block_size)
            move_tokens(cache, torch.cat(sources).to(cache.device), torch.cat(targets).to(cache.device))

    # -- drafting ------------------------------------------------------------------------
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, slot_mappings):
        self.drafter.last_trees = []
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        self.drafter.batch_req_ids = req_ids
        all_undrafted = not self._drafted_rows.any()
        if all_undrafted:
            self.drafter.skipped_steps += 1
        skipped = self._keeps_rows or all_undrafted
        left = None if skipped else self._tokens_left(req_ids)  # dormant steps need none
        finishing = left is not None and max(left) <= 1  # every request ends with its next token
        if skipped or finishing:
            self._root_candidates = None
            return [[] for _ in req_ids]
        self._chain_accepted_rows(hidden_states, aux_hidden_states, spec_decode_metadata)
        most = self.drafter.max_nodes
        self.drafter.draft_caps = [min(most, tokens - 1) if plain and drafted and tokens else 0
                                   for plain, drafted, tokens in zip(self._plain, self._drafted_rows.tolist(),
                                                                     left or [most + 1] * len(req_ids))]
        self.drafter.draft_caps_req_ids = list(req_ids)
        self.drafter.next_batch = None if left is None else sum(1 for tokens in left if tokens)
        self.drafter.sampled_rows = self._sampled
        # A request decoding alone whose drafts this step verified: its probes may be judged now.
        self.drafter.solo_step_so_far = ((self._emitted_tokens, self._step_clock.elapsed())
                                         if self._verified_drafts and len(req_ids) == 1 else None)
        started = time.perf_counter()
        drafts = super().propose_draft_token_ids(
            scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
            aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings)
        self._drafting_seconds = time.perf_counter() - started
        self.drafter.solo_step_so_far = None
        req_ids = self.input_batch.req_ids
        self.cast_trees = {req_ids[i]: tree for i, tree in enumerate(self.drafter.last_trees) if len(tree) > 1}
        roots = self.drafter.last_root_candidates
        self._root_candidates = None if roots is None else (list(req_ids[: roots[0].shape[0]]), *roots)
        if self.drafter.last_decision is not None:
            self.cast_stats.record(self.drafter.last_decision, len(self.drafter.last_trees))
        return drafts

    def _skips_drafting(self, req_ids: list[str], num_scheduled_tokens: np.ndarray) -> bool:
        """Before the forward of a step that verifies no drafts and has drafted requests:
        whether it skips the draft model, its drafted requests' rows kept for the next
        drafting step (``_remember_rows``): CAST is dormant (see vllm_cast.dormancy) or
        measures plain decoding at this batch size first (``CastProposer.measures_plain_first``),
        or the batch is a lone arrival expecting company or one request waiting for its
        re-probe (see vllm_cast.solo_probes). Decided here, such a step runs as vLLM's plain
        decoding (``_prepare_inputs``): through the speculative path it cost 0.36 ms more
        than vanilla's 2.82 ms at greedy B=4, against 0.03 ms for a step with nothing to keep.
        Called after ``_undraft_if_hopeless``, which hands the drafter this batch's ids."""
        rows = int(num_scheduled_tokens[: len(req_ids)][self._drafted_rows].sum())
        fits = self.drafter.dormancy.fits(rows)
        if self._lone_arrival and self.drafter.solo.expects_company():
            self._prompt_deferred = fits
            return fits
        if self.drafter.awaits_solo_probe(self._all_sampled):
            return False
        if self.drafter.solo_waits(self._all_sampled) and fits:
            self.drafter.solo.waited_a_step(req_ids[0])
            return True
        return (fits and self.drafter.measures_plain_first(self._all_sampled)) or self.drafter.dormancy.should_skip(rows)

    def _remember_rows(self, aux_hidden_states: list[torch.Tensor]) -> None:
        """Hand the dormancy stash this step's rows of its drafted requests (``_drafted_rows``):
        copies of their token ids and positions, and their auxiliary hidden states."""
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        keep = self._drafted_rows
        starts = self.query_start_loc.np[: len(req_ids) + 1]
        if keep.all():  # one slice (index tensors took ~0.1 ms of a 3 ms step at B=4)
            rows, kept_ids, offsets = slice(0, int(starts[-1])), req_ids, starts.tolist()
        else:
            kept = np.flatnonzero(keep)
            rows = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in kept])).to(
                self.input_ids.gpu.device)
            kept_ids = [req_ids[i] for i in kept]
            offsets = np.concatenate([[0], np.cumsum(starts[kept + 1] - starts[kept])]).tolist()
        self.drafter.dormancy.remember(kept_ids, self.input_ids.gpu[rows].clone(), self.positions[rows].clone(),
                                       torch.cat([h[rows] for h in aux_hidden_states], dim=-1), offsets)

    def _undraft(self, req_ids: list[str]) -> None:
        """These requests stop being drafted for good (see _undraft_if_hopeless)."""
        self._undrafted.update(req_ids)
        self._undrafted_total += len(req_ids)

    def _undraft_unpayable_prompts(self, new_requests: list, batch: int) -> None:
        """New requests (vLLM's ``NewRequestData``) whose prompt the draft's first pass could
        never be repaid for (``CastProposer.prompt_pass_pays``, at the batch size arriving
        requests decode at, vllm_cast.arrivals) are not drafted from their first step."""
        batch_size = self._arrivals.judged_batch_size(batch, arriving=True)
        unpayable = [request.req_id for request in new_requests if not self.drafter.prompt_pass_pays(
            batch_size, len(request.prompt_token_ids or ()),
            None if request.sampling_params is None else request.sampling_params.max_tokens, self._all_sampled)]
        if unpayable:
            self._undraft(unpayable)

    def _chain_accepted_rows(self, hidden_states: torch.Tensor, aux_hidden_states: list[torch.Tensor] | None,
                             spec_decode_metadata: SpecDecodeMetadata | None) -> None:
        """Reorder the rows the drafter's first pass reads (token ids, positions, target
        hidden states) so each accepted path sits right after its root, as a chain would."""
        if spec_decode_metadata is None:
            return
        starts = self.query_start_loc.np
        for index, context, path in self._moved_paths():
            start = int(starts[index])
            source = start + path
            target = start + torch.arange(1, len(path) + 1)
            for rows in [self.input_ids.gpu, hidden_states, *(aux_hidden_states or [])]:
                rows[target.to(rows.device)] = rows[source.to(rows.device)].clone()
            count = spec_decode_metadata.num_draft_tokens[index] + 1
            self.positions[start : start + count] = context + torch.arange(count)


class CastCPUModelRunner(CastRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner (V1) with CAST trees."""
