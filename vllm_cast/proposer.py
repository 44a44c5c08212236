"""CAST's drafter: vLLM's EAGLE-3 proposer with the chain loop replaced by a cost-aware
tree (dynamic expansion, breadth/depth pruning, dynamic reranking; see tree_builder).

Per step: vLLM's EAGLE first pass over the verified tokens (unchanged), then one draft
forward per tree layer whose queries are that layer's frontier nodes. A frontier node at
depth ``d`` is forwarded at RoPE position ``p + d`` (``p``: the position of the request's
last verified row) and its draft K/V is written at the next free logical slot after
``p``; it attends to the whole verified context and to its own ancestors among the nodes
forwarded earlier (a tree plan for the CPU attention backend). The verified tree goes back
to vLLM flattened in topological order as the request's draft tokens."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter, deque
from collections.abc import Callable

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_cast import pricing
from vllm_cast.acceptance import AcceptanceCalibrator
from vllm_cast.attention.tree_plan import TreePlan, TreeRequest, active_plan
from vllm_cast.batch_rows import row_numbers
from vllm_cast.chain_builder import CHAIN_STEPS, CastChainBuilder
from vllm_cast.cost_model import StepCosts
from vllm_cast.cost_tables import CONTEXT_BUCKET
from vllm_cast.dormancy import DraftDormancy
from vllm_cast.first_pass_rows import drafted_rows_only, recurring_first_pass_rows
from vllm_cast.solo_probes import SoloProbes
from vllm_cast.step_overheads import PLAIN_SAMPLES_LAST, StepOverheads, batch_bucket
from vllm_cast.throughput import MIN_STEPS, MeasuredThroughput
from vllm_cast.tree import DraftChain, DraftTree
from vllm_cast.tree_builder import CastTreeBuilder, Frontier, StepDecision

PROBE_INTERVAL_STEPS = 64
"""Most steps CAST skips the draft model after deciding not to speculate (see dormancy)."""
PLAIN_FIRST_STEPS = 2 * MIN_STEPS
"""Most steps per batch-size bucket and mode that skip the draft model to measure plain
decoding before speculating there (``measures_plain_first``; steps with new prompts are no
samples, so under constant arrivals plain decoding may not get measured this way)."""
HOPELESS_MEMO_SIZE = 256
"""(batch size, context bucket, mode) verdicts of ``speculation_hopeless`` kept at once."""

CostSource = Callable[[int, float], StepCosts]
"""(batch size, mean context length in tokens) -> the step's cost curves."""


@dataclasses.dataclass
class _DraftedNodes:
    """Nodes already run through the draft model this step, per request.

    count: nodes forwarded so far (F); hidden ``[B, W, H]`` the newest layer's draft hidden
    states (inputs of its children); offset: index of the newest layer's first node among
    the F; ancestors ``[B, F, F]`` bool (row i: node i and its forwarded ancestors), None
    while every layer so far had one node (a chain: the next single node attends
    causally through vLLM's own attention path, and the mask is built only if a wider
    layer follows)."""

    hidden: torch.Tensor
    count: int = 0
    offset: int = -1
    ancestors: torch.Tensor | None = None

    @property
    def chain(self) -> bool:
        return self.ancestors is None

    def ancestor_rows(self, batch: int) -> torch.Tensor:
        """``[B, F, F]`` ancestor mask of the forwarded nodes (a chain's is lower-triangular)."""
        if self.ancestors is None:
            return torch.ones(self.count, self.count, dtype=torch.bool).tril().expand(batch, -1, -1)
        return self.ancestors


@dataclasses.dataclass
class _LayerSlots:
    """Where a step's tree layers live, per request (numpy, on the CPU): ``root_positions``
    ``[B]`` int64 the RoPE position of the last verified row; ``prefix`` ``[B]`` int32 the
    verified draft context (tokens); ``slots`` ``[B, N]`` int64 the draft KV cache slots
    of its next ``N`` logical positions (one per draft node the step may forward)."""

    root_positions: np.ndarray
    prefix: np.ndarray
    slots: np.ndarray

    @classmethod
    def of(cls, root_positions: torch.Tensor, block_table: torch.Tensor, block_size: int, nodes: int) -> _LayerSlots:
        """From the roots' positions ``[B]`` and the block table ``[B, max_blocks]``."""
        positions = root_positions.cpu().numpy().astype(np.int64)
        logical = positions[:, None] + (1 + np.arange(nodes))
        table = block_table.cpu().numpy()
        block_ids = table[row_numbers(positions.size), np.minimum(logical // block_size, table.shape[1] - 1)]
        return cls(positions, (positions + 1).astype(np.int32), block_ids.astype(np.int64) * block_size + logical % block_size)


class _LayerInputs:
    """What a step's draft layers after the first pass need, built when the first of them
    is forwarded (a step drafting depth-1 chains forwards none; building both took ~60 us
    of a 5 ms greedy B=4 step): the nodes' KV slots (:class:`_LayerSlots`) and attention
    metadata (the first pass's, rewritten per layer)."""

    def __init__(self, root_positions: torch.Tensor, cad: CommonAttentionMetadata, block_size: int,
                 nodes: int) -> None:
        self._root_positions, self._first_pass_cad = root_positions, cad
        self._block_size, self._nodes = block_size, nodes

    @functools.cached_property
    def slots(self) -> _LayerSlots:
        return _LayerSlots.of(self._root_positions, self._first_pass_cad.block_table_tensor, self._block_size,
                              self._nodes)

    @functools.cached_property
    def cad(self) -> CommonAttentionMetadata:
        return dataclasses.replace(self._first_pass_cad, positions=None, seq_lens_cpu_upper_bound=None, causal=True)


class CastProposer(EagleProposer):
    """EAGLE-3 proposer drafting CAST trees; returns per-request draft lists."""

    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner=runner)
        spec = vllm_config.speculative_config
        self.cast_params = spec.cast
        self.max_nodes = spec.num_speculative_tokens
        self.ratio_history: deque[float] = deque([1.0], maxlen=self.cast_params.ratio_buffer_size)
        self.calibrator = AcceptanceCalibrator()
        self.cost_source: CostSource | None = None
        self.draft_caps: list[int] | None = None
        """Per batch row: the most draft tokens it may verify next step, at most
        ``max_nodes`` (0: not drafted; less near its ``max_tokens``); None: every row up to
        ``max_nodes``. Set by the runner before each proposal."""
        self.draft_caps_req_ids: list[str] = []
        """The requests of the rows ``draft_caps`` was set for (the runner sets both)."""
        self.next_batch: int | None = None
        """Requests the next step verifies: the batch less those whose ``max_tokens`` this step
        reaches (None: the whole batch). Set by the runner with ``draft_caps``."""
        self.sampled_rows = torch.zeros(0, dtype=torch.bool)
        """Per batch row: verified by sampling (else greedy); set by the runner."""
        self.batch_req_ids: list[str] = []
        """Request ids of the batch rows (set by the runner before each proposal)."""
        self.solo_step_so_far: tuple[int, float] | None = None
        """During a proposal for one request alone whose drafts the step verified: the
        tokens it emitted and the step's seconds so far (set by the runner; None otherwise)."""
        self.dormancy = DraftDormancy(PROBE_INTERVAL_STEPS, self.max_num_tokens)
        self.overheads = StepOverheads()
        self.throughput = MeasuredThroughput()
        self._speculated_last_call = False
        """Whether the previous proposal kept a tree (else this one probes: it may speculate
        even while speculation measures slower, which keeps those measurements fresh)."""
        self._hopeless_memo: dict[tuple[int, int, bool], bool] = {}
        self._hopeless_calls = 0
        self.solo = SoloProbes()
        self.prompts_paid = False
        """No request of this step's batch is arriving: every drafted request's prompt pass is
        spent or owed already (the draft read its prompt, or its rows wait in the dormancy
        stash); set by the runner each step."""
        self.skipped_steps = 0
        """Steps on which the draft model did not run (dormant; counted by the runner)."""
        self.plain_first_steps: Counter[tuple[int, bool]] = Counter()
        """Per (bucket, mode): steps skipped to measure plain decoding first."""
        self.plain_refresh: tuple[int, int] | None = None
        """(bucket, steps still to skip) while measuring plain decoding afresh; the batch
        leaving the bucket ends it (a count left over would force plain steps whenever the
        bucket came back)."""
        self.plain_measured_at: dict[int, float] = {}
        """Per bucket: ``time.monotonic()`` when skipping steps to measure plain decoding last
        began (``measures_plain_first``)."""
        self.chain_steps_left = 0
        """Steps still to draft as chains before the tree builder decides again (see
        ``_plan_next_builder``)."""
        self.last_trees: list[DraftTree] = []
        self.last_decision: StepDecision | None = None
        self.last_root_candidates: tuple[np.ndarray, np.ndarray] | None = None
        """Each request's top-K first draft tokens and their probabilities ``[B, K]``: the
        calibrator learns from them every step, speculating or not."""
        self._draft_to_target: np.ndarray | None = None
        """The draft head's draft-to-target token offsets ``[draft vocabulary]`` (int64), read
        once its weights are loaded (None for heads without them)."""

    @property
    def draftable(self) -> list[bool] | None:
        """Per batch row: whether it is drafted (``draft_caps`` above 0; None: every row)."""
        return None if self.draft_caps is None else [cap > 0 for cap in self.draft_caps]

    def load_model(self, target_model) -> None:
        """vLLM's loading, then the draft-to-target offsets copied out for ``_top_children``."""
        super().load_model(target_model)
        offsets = self.model.draft_id_to_target_id
        self._draft_to_target = None if offsets is None else offsets.cpu().numpy()

    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings=None) -> None:
        """Warm-up/profiling passes: one per possible tree layer, not one per node."""
        configured, self.num_speculative_tokens = self.num_speculative_tokens, min(
            self.num_speculative_tokens, self.cast_params.max_depth + 1)
        try:
            super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
        finally:
            self.num_speculative_tokens = configured

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None) -> list[list[int]]:
        """vLLM's proposer interface; returns the draft tokens of each request's tree."""
        batch = common_attn_metadata.batch_size()
        self.last_trees, self.last_decision, self.last_root_candidates = [], None, None
        target_token_ids, target_positions, target_hidden_states, token_indices_to_sample, common_attn_metadata = \
            drafted_rows_only(self.draftable, target_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, common_attn_metadata)
        no_padding = num_rejected_tokens_gpu is None or not bool(num_rejected_tokens_gpu.any())
        replayed = None
        if no_padding and self.dormancy.stashed_rows:
            replayed = self.dormancy.replay(self.batch_req_ids, target_token_ids, target_positions,
                                            target_hidden_states, common_attn_metadata, self.block_size)
            if replayed is not None:
                target_token_ids, target_positions, target_hidden_states, common_attn_metadata, \
                    token_indices_to_sample = replayed
                num_rejected_tokens_gpu = None
        first_pass_tokens = target_token_ids.shape[0]
        first_pass_rows = first_pass_tokens / batch  # rows per request in the first pass
        normed, hidden, cad, sample_rows = self._first_pass(
            target_token_ids, target_positions, target_hidden_states, next_token_ids, token_indices_to_sample,
            common_attn_metadata, num_rejected_tokens_gpu)
        sampled = self.sampled_rows if self.sampled_rows.numel() == batch else torch.zeros(batch, dtype=torch.bool)
        all_sampled = bool(sampled.all())
        if (num_speculative_tokens == 0 or self.cost_source is None or self._solo_slower()
                or self._starts_plain_refresh(batch, all_sampled)):
            return [[] for _ in range(batch)]
        root_positions = self.positions[sample_rows]
        layer_inputs = _LayerInputs(root_positions, cad, self.block_size, self.max_nodes)
        # Context the next verification attends over, in tokens, averaged over the batch.
        context = sum(root_positions.tolist()) / batch + 2
        # Trees are priced at the batch that verifies them: requests this step ends leave it.
        verifying = min(self.next_batch or batch, batch)
        table_costs = self.cost_source(verifying, context)
        costs = self.overheads.adjust(verifying, table_costs)
        probe = self.awaits_solo_probe(all_sampled)
        draft = self._draft_probe if probe else self._draft_trees
        recurring_rows = recurring_first_pass_rows(common_attn_metadata.query_start_loc_cpu,
                                                   self.cast_params.max_depth + 1)
        forwarded_widths = draft(normed, hidden, layer_inputs, next_token_ids, sampled, costs, recurring_rows)
        decision = self.last_decision
        decision.draft_forward_tokens = [first_pass_tokens, *(batch * width for width in forwarded_widths)]
        decision.replayed = replayed is not None
        chains = probe or decision.chain_step or all(tree.is_chain for tree in self.last_trees)
        if not probe and self.cast_params.decline_unprofitable and any(decision.verified) and self._declines(
                batch, verifying, all_sampled, costs, forwarded_widths, chains):
            self.last_trees = [tree.prefix(1) for tree in self.last_trees]
            decision.verified = [0] * batch
            decision.declined = True
        self._speculated_last_call = any(decision.verified)
        if self._speculated_last_call:
            self.dormancy.wake()
        else:
            self.dormancy.enter()
        drafting_costs = table_costs if verifying == batch else self.cost_source(batch, context)
        decision.predicted_first_pass_seconds = pricing.first_pass_seconds(drafting_costs, first_pass_rows)
        decision.predicted_layer_seconds = pricing.layer_seconds(drafting_costs, forwarded_widths)
        decision.predicted_verify_seconds = pricing.verify_seconds(table_costs, max(decision.verified), chains)
        priced_drafting = costs if verifying == batch else self.overheads.adjust(batch, drafting_costs)
        decision.priced_draft_seconds = pricing.draft_seconds(priced_drafting, forwarded_widths, first_pass_rows)
        decision.priced_verify_seconds = pricing.verify_seconds(costs, max(decision.verified), chains)
        return [tree.draft_tokens for tree in self.last_trees]

    def awaits_solo_probe(self, all_sampled: bool) -> bool:
        """Whether this step's batch is one request whose next drafting step is a probe
        (vllm_cast.solo_probes; it drafts now, dormant or not)."""
        return (len(self.batch_req_ids) == 1 and self.cast_params.decline_unprofitable
                and self._may_take_drafts(self.batch_req_ids[0])
                and self.solo.wants_probe(self.batch_req_ids[0], all_sampled))

    def _may_take_drafts(self, req_id: str) -> bool:
        """Whether the last drafting call that capped ``req_id``'s drafts left it any (True
        if none did yet). Before a step's forward, ``draft_caps`` are still the last call's,
        whose rows may have been other requests. Read by row, a lone request could meet a
        0 left by another request in its row, draft no probe and sit out a dormant stretch
        left by that batch (seen in CI as a lone request's probe drafted two steps late)."""
        if req_id not in self.draft_caps_req_ids or self.draft_caps is None:
            return True
        return self.draft_caps[self.draft_caps_req_ids.index(req_id)] > 0

    def measures_plain_first(self, all_sampled: bool) -> bool:
        """Whether this step's batch (several requests) skips the draft model to measure
        plain decoding at its batch size: before speculating there (counted against
        ``PLAIN_FIRST_STEPS`` for the bucket and mode), or afresh when the bucket's plain
        samples are stale (``StepOverheads.plain_is_stale``; the next ``PLAIN_FIRST_STEPS``
        steps while the batch stays in the bucket, at most once per ``PLAIN_SAMPLES_LAST``
        seconds: under constant arrivals plain steps may yield no samples). The rows are
        kept and replayed as dormant ones are (vllm_cast.dormancy). Speculating first, CAST
        then declined every other tree to measure plain steps (each declined step had run
        the draft in full) and needed more waves to judge: in benchmark order, 32 tokens,
        MT-Bench's greedy B=4 cells read 0.56-0.58x, 0.56-0.57x and 0.76-0.77x of vanilla
        before the verdict held, and 0.62-0.67x and 0.77-0.81x with plain decoding measured
        first."""
        batch = len(self.batch_req_ids)
        if batch < 2 or not self.cast_params.decline_unprofitable or self.cost_source is None:
            return False
        bucket = batch_bucket(batch)
        key = (bucket, all_sampled)
        if self.plain_refresh is not None:
            refresh_bucket, steps_left = self.plain_refresh
            if refresh_bucket == bucket:
                self.plain_refresh = (bucket, steps_left - 1) if steps_left > 1 else None
                return True
            self.plain_refresh = None  # the batch left the refresh's bucket
        if self.plain_first_steps[key] >= PLAIN_FIRST_STEPS or self.throughput.plain_rate(batch, all_sampled) is not None:
            return False
        self.plain_first_steps[key] += 1
        self.plain_measured_at.setdefault(bucket, time.monotonic())
        return True

    def _starts_plain_refresh(self, batch: int, all_sampled: bool) -> bool:
        """Whether this drafting call drafts nothing so that the next ``PLAIN_FIRST_STEPS``
        steps measure plain decoding afresh (``measures_plain_first``): the batch has several
        requests, plain decoding was measured at its bucket, but its plain samples are stale
        (``StepOverheads.plain_is_stale``) and the last measurement began over
        ``PLAIN_SAMPLES_LAST`` seconds ago (under constant arrivals plain steps may yield no
        samples). The stale samples are dropped. In a drafted stretch every step verifies
        drafts, so plain decoding is measured only if a drafting call stops it."""
        if batch < 2 or not self.cast_params.decline_unprofitable or not self.overheads.plain_is_stale(batch):
            return False
        bucket = batch_bucket(batch)
        now = time.monotonic()
        if (now - self.plain_measured_at.get(bucket, 0.0) <= PLAIN_SAMPLES_LAST
                or self.throughput.plain_rate(batch, all_sampled) is None):
            return False
        self.overheads.forget_plain(batch)
        self.plain_measured_at[bucket] = now
        self.plain_refresh = (bucket, PLAIN_FIRST_STEPS)
        return True

    def solo_waits(self, all_sampled: bool) -> bool:
        """Whether this step's batch is one probed request that measured slower and waits
        for its re-probe (vllm_cast.solo_probes): its rows are kept, the draft does not run."""
        return bool(self._solo_slower()) and self.solo.reprobes(all_sampled)

    def _draft_trees(self, normed: torch.Tensor, hidden: torch.Tensor, layer_inputs: _LayerInputs,
                     next_token_ids: torch.Tensor, sampled: torch.Tensor,
                     costs: StepCosts, first_pass_rows: float) -> list[int]:
        """CAST's trees for the batch from the first pass's normed/pre-norm hidden states
        ``[B, H]`` (vllm_cast.tree_builder), their first pass priced at ``first_pass_rows``
        rows per request (``first_pass_rows.recurring_first_pass_rows``); sets ``last_trees``,
        ``last_decision`` (with the layer loop's wall time) and ``last_root_candidates``.
        Returns each forwarded layer's width."""
        batch = hidden.shape[0]
        chain_step = self.chain_steps_left > 0
        first_pass_cost = pricing.first_pass_seconds(costs, first_pass_rows) / costs.plain_step_seconds
        calibrated = self.cast_params.acceptance_calibration
        deep_scales = self.calibrator.deep_scales(self.batch_req_ids) if calibrated else None
        if chain_step:
            builder = CastChainBuilder(
                self.cast_params, costs, self.max_nodes, self.ratio_history, first_pass_cost=first_pass_cost,
                calibrate_row=self.calibrator.row_estimator(sampled, self.batch_req_ids) if calibrated else None,
                deep_scales=deep_scales)
        else:
            builder = CastTreeBuilder(
                self.cast_params, costs, self.max_nodes, self.ratio_history, first_pass_cost=first_pass_cost,
                calibrate=self.calibrator.estimator(sampled.numpy(), self.batch_req_ids) if calibrated else None,
                deep_scales=deep_scales)
        frontier = builder.start_top(*self._top_children(normed))
        self.last_root_candidates = builder.root_candidates
        drafted = _DraftedNodes(hidden=hidden[:, None, :])
        caps = self.draft_caps or [self.max_nodes] * batch
        deepest = max(caps)  # no request can emit a node deeper than its cap
        forwarded_widths = []
        loop_started = time.perf_counter()
        # Forwarding the frontier drafts its children, at depth len(forwarded_widths) + 2.
        while frontier is not None and len(forwarded_widths) + 2 <= deepest and self._fits(drafted, frontier, batch):
            forwarded_widths.append(frontier.width)
            normed, layer_hidden = self._forward_layer(frontier, drafted, layer_inputs, depth=builder.decision.depth)
            drafted.offset = drafted.count - frontier.width
            drafted.hidden = layer_hidden.view(batch, frontier.width, -1)
            probs, tokens = self._top_children(normed)
            frontier = builder.expand_top(probs.reshape(batch, frontier.width, -1), tokens.reshape(batch, frontier.width, -1))
        layer_seconds = time.perf_counter() - loop_started
        self.last_trees = builder.finish(next_token_ids.tolist(), caps)
        self.last_decision = builder.decision
        self.last_decision.measured_layer_seconds = layer_seconds
        self.last_decision.chain_step = chain_step
        self._plan_next_builder(builder)
        return forwarded_widths

    def _plan_next_builder(self, builder: CastTreeBuilder | CastChainBuilder) -> None:
        """After a step drafted by ``builder``: the next ``CHAIN_STEPS`` steps draft chains
        (vllm_cast.chain_builder) when the tree builder's trees were all chains, one fewer
        after each chain step, none once a chain step's breadth rule wanted a wider layer."""
        if isinstance(builder, CastChainBuilder):
            self.chain_steps_left = 0 if builder.wanted_width else self.chain_steps_left - 1
        elif (self.cast_params.decision_scope == "batch" and max(builder.decision.widths) == 1
              and all(tree.is_chain for tree in self.last_trees)):
            self.chain_steps_left = CHAIN_STEPS
        else:
            self.chain_steps_left = 0

    def _draft_probe(self, normed: torch.Tensor, hidden: torch.Tensor, layer_inputs: _LayerInputs,
                     next_token_ids: torch.Tensor, sampled: torch.Tensor,
                     costs: StepCosts, first_pass_rows: float) -> list[int]:
        """A probe for the one request decoding alone (vllm_cast.solo_probes), in place of
        :meth:`_draft_trees` (same arguments and results; ``costs`` are not needed): a top-1
        chain as deep as ``max_depth`` and the node budget allow (less once recent probes of
        its mode, or the request's own, were accepted less deep: ``SoloProbes.probe_depth``;
        its own include the drafts this step verified, so a second probe goes by the first),
        verified whole. The depth
        rule's ratio history restarts at {1}: its ratios were earlier requests' (after
        MT-Bench requests they stopped a humaneval request's first trees at depth 1 although
        both of its probes were accepted whole)."""
        req_id = self.batch_req_ids[0]
        if self.solo_step_so_far is not None:  # this step verified its previous drafts
            self.solo.note_runs([req_id], [self.solo_step_so_far[0] - 1])
        self.solo.drafted_probe(req_id)
        self.ratio_history.clear()
        self.ratio_history.append(1.0)
        deepest = min(self.cast_params.max_depth, self.max_nodes, *(self.draft_caps or []))
        depth = self.solo.probe_depth(req_id, bool(sampled.all()), deepest)
        drafted = _DraftedNodes(hidden=hidden[:, None, :])
        probs, tokens = self._top_children(normed)
        self.last_root_candidates = (tokens, probs)
        chain_probs, chain_tokens = [probs[0, 0]], [tokens[0, 0]]
        loop_started = time.perf_counter()
        for layer in range(1, depth):
            frontier = Frontier(tokens=tokens[:, :1], parent_slot=np.full((1, 1), -1 if layer == 1 else 0),
                                valid=np.ones((1, 1), dtype=bool), pool_index=np.full((1, 1), layer))
            normed, layer_hidden = self._forward_layer(frontier, drafted, layer_inputs, depth=layer)
            drafted.offset, drafted.hidden = drafted.count - 1, layer_hidden.view(1, 1, -1)
            probs, tokens = self._top_children(normed)
            chain_probs.append(probs[0, 0])
            chain_tokens.append(tokens[0, 0])
        layer_seconds = time.perf_counter() - loop_started
        node_probs, node_tokens = np.array(chain_probs)[None], np.array(chain_tokens)[None]
        estimate = self.calibrator.estimator(sampled.numpy(), self.batch_req_ids)
        estimates = np.concatenate([estimate(node_probs[:, :1, None]), estimate(node_probs[:, 1:, None], deep=True)], 1)
        self.last_trees = DraftChain.batch(next_token_ids.tolist(), node_tokens.tolist(),
                                           np.cumprod(estimates.reshape(1, depth), axis=1).tolist(),
                                           node_probs.tolist(), np.zeros_like(node_tokens).tolist(), [depth])
        expected_accepted = sum(self.last_trees[0].values[1:])
        self.last_decision = StepDecision(widths=[1] * depth, verified=[depth], expected_accepted=expected_accepted,
                                          measured_layer_seconds=layer_seconds)
        return [1] * (depth - 1)

    def _solo_slower(self) -> bool | None:
        """For one probed request decoding alone, whether its own speculative steps measured
        slower than plain decoding (vllm_cast.solo_probes; during a proposal, with the running
        step so far, ``solo_step_so_far``); None for any other batch."""
        if len(self.batch_req_ids) != 1:
            return None
        return self.solo.slower(self.batch_req_ids[0], self.solo_step_so_far)

    def _declines(self, batch: int, verifying: int, all_sampled: bool, costs: StepCosts, forwarded_widths: list[int],
                  chains: bool) -> bool:
        """Whether this step's trees (``last_decision``) are dropped: a probed request
        decoding alone whose own steps measured slower (vllm_cast.solo_probes), other
        batches' pooled measured verdict right after a speculating step (unless every request's
        prompt has been read and speculative decode steps alone measure faster, see
        ``speculation_hopeless``), else the price of
        the whole step against plain decoding (``pricing.beats_plain_decoding``), both at the
        ``verifying`` requests of the ``batch`` that the next step keeps (``costs`` are
        theirs): priced over the whole batch, the requests this step ends counted as
        accepting nothing and as verifying at the larger batch size, which priced the trees
        of the requests left too dear at the end of every wave. Session 21
        tried judging a solo request on its own verdict alone once formed: greedy B=1
        offline rose from 1.01x to 1.06x of vanilla (the gate had declined a qa request's
        shallow chains every other step), but the OpenAI server with 4 clients fell from
        0.92-0.95x to 0.87-0.88x (two runs each), so solo requests are priced as well."""
        solo = self._solo_slower()
        if solo:
            return True
        if solo is None and self._speculated_last_call and self.throughput.should_decline(verifying, all_sampled,
                                                                                          self.prompts_paid):
            return True
        decision = self.last_decision
        expected_per_verifying = decision.expected_accepted * batch / verifying  # a batch mean over all rows
        return not pricing.beats_plain_decoding(costs, forwarded_widths, expected_per_verifying,
                                                max(decision.verified), chains)

    def retain(self, req_ids: list[str]) -> None:
        """Forget per-request state of requests not in ``req_ids`` (finished or preempted)."""
        self.calibrator.retain(req_ids)
        self.solo.retain(req_ids)
        self.throughput.retain(req_ids)

    def speculation_hopeless(self, batch_size: int, context: float, all_sampled: bool,
                             prompts_paid: bool = False) -> bool:
        """Whether no chain can beat plain decoding at this batch size: speculating measured
        slower than plain decoding here (vllm_cast.throughput), or with the learned
        first-rank acceptance rate ``a`` and the measured overheads, ``1 + a + ... + a^d``
        tokens never pay for drafting ``d`` tokens and verifying them (see
        ``pricing.no_chain_can_pay``). Then the batch's requests are not drafted at all (the
        runner's ``_undraft_if_hopeless``). Until the batch size's bucket has measured its own
        verification overhead (``StepOverheads.verifications_measured``), the priced verdict
        also holds when no chain can pay at the largest batch size of any smaller bucket:
        speculation's gain only shrinks as the batch grows, and the table's cells for a batch
        size that never verified are unchecked (the 2-core EPYC's profile priced verifying 2
        tokens a request at B=32 at 9.51 ms against 9.48 ms for plain B=32 steps, where such
        steps measured 12.3 ms against 8.6; with B=4-16 hopeless by price, B=32's first waves
        were drafted and read 0.70x and 0.85x of vanilla; that cell is now raised when the
        table is read, ``cost_model.additions_grow_with_batch``, and this rule stands for the
        errors no consistency rule catches). The measured verdict is read afresh
        on every call; the priced one is memoised per batch size, context bucket, mode and
        rate, and all priced verdicts are forgotten every ``PROBE_INTERVAL_STEPS`` calls. A
        request decoding alone is judged on its own probes instead (vllm_cast.solo_probes):
        hopeless once they measured slower where its mode's requests are not re-probed, never
        while they measure no slower; before its probes, or while it waits to be re-probed,
        hopeless only when no chain could pay even at the highest first-rank rate among its
        mode's recent requests (one lucky probe in the last ``PROBE_OUTCOMES`` kept sampled
        requests on the bench pair probed and re-probed, where no chain could pay at any of
        their rates: T=1 B=1 read 0.93x of vanilla). ``prompts_paid``: the batch's requests
        have had their prompts read by the draft; the measured verdict then does not make
        speculation hopeless while speculative decode steps alone measure faster than plain
        ones (``MeasuredThroughput.decode_steps_faster``)."""
        if self.cost_source is None or not self.cast_params.decline_unprofitable:
            return False
        solo = self._solo_slower()
        if solo is not None or self.awaits_solo_probe(all_sampled):
            if solo is False:
                return False  # probed, and its own steps measured no slower (yet)
            if solo and not self.solo.reprobes(all_sampled):
                return True
            # Awaiting its probe, or its re-probe: unless no recent request's own rate could pay.
            return self._priced_hopeless(batch_size, context, all_sampled, best_rate=True)
        if self.throughput.measured_slower(batch_size, all_sampled, prompts_paid):
            return True
        return self._priced_hopeless(batch_size, context, all_sampled)

    def _priced_hopeless(self, batch_size: int, context: float, all_sampled: bool, best_rate: bool = False) -> bool:
        """The priced verdict of :meth:`speculation_hopeless` (memoised), at the mode's
        settled first-rank rate or, with ``best_rate``, at the highest of its recent
        requests' own rates (``AcceptanceCalibrator.first_rank_rate``)."""
        self._hopeless_calls += 1
        if self._hopeless_calls % PROBE_INTERVAL_STEPS == 0 or len(self._hopeless_memo) >= HOPELESS_MEMO_SIZE:
            self._hopeless_memo.clear()
        priced_sizes = [batch_size]
        if not self.overheads.verifications_measured(batch_size):
            priced_sizes += [1 << bucket for bucket in range(batch_bucket(batch_size) - 1, -1, -1)]
        context_bucket = round(context / CONTEXT_BUCKET)
        for size in priced_sizes:
            key = (size, context_bucket, all_sampled, best_rate)
            if key not in self._hopeless_memo:
                self._hopeless_memo[key] = self._no_chain_can_pay(size, context, all_sampled, best_rate)
            if self._hopeless_memo[key]:
                return True
        return False

    def prompt_pass_pays(self, batch_size: int, prompt_tokens: int, new_tokens: int | None, all_sampled: bool) -> bool:
        """Whether a new request, decoding at ``batch_size`` with a prompt of
        ``prompt_tokens`` and at most ``new_tokens`` to generate (None: unbounded), could
        repay the draft's pass over its prompt (``pricing.prompt_pass_pays``, at the learned
        first-rank acceptance rate and the measured overheads; True until both are known, the
        rate over ``MIN_RATE_REQUESTS`` requests).
        With this fixture's head (first-rank rate ~0.9 greedy, ~0.06 sampled) sum's 1.4k-token
        prompts with 64 new tokens cannot pay from greedy B=16 on, nor sampled at any batch
        size: drafted where no verdict stood, their prompt passes cost up to 0.4 s of a
        1.5-3.4 s wave before the requests were undrafted."""
        if new_tokens is None or self.cost_source is None or not self.cast_params.decline_unprofitable:
            return True
        rate = self.calibrator.first_rank_rate(sampled=all_sampled)
        if rate is None:
            return True
        costs = self.overheads.adjust(batch_size, self.cost_source(batch_size, float(prompt_tokens)))
        return pricing.prompt_pass_pays(costs, prompt_tokens, new_tokens, rate)

    def _no_chain_can_pay(self, batch_size: int, context: float, all_sampled: bool, best_rate: bool = False) -> bool:
        """The priced half of :meth:`speculation_hopeless`, computed afresh (greedy rate
        unless every request samples, the mode's or with ``best_rate`` its best recent
        request's; never hopeless before that rate spans ``MIN_RATE_REQUESTS`` requests,
        vllm_cast.acceptance)."""
        rate = self.calibrator.first_rank_rate(sampled=all_sampled, best=best_rate)
        if rate is None:
            return False
        costs = self.overheads.adjust(batch_size, self.cost_source(batch_size, context))
        return pricing.no_chain_can_pay(costs, rate, min(self.cast_params.max_depth, self.max_nodes))

    def _fits(self, drafted: _DraftedNodes, frontier: Frontier, batch: int) -> bool:
        """Whether one more layer fits the K lookahead slots and the token buffers."""
        return (drafted.count + frontier.width <= self.max_nodes
                and batch * frontier.width <= self.input_ids.shape[0])

    def _top_children(self, normed_hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Top-K draft probabilities (float64) and target-vocabulary tokens (int64), ``[n, K]``
        each, from normed hidden ``[n, H]``: the top-K of the draft vocabulary's log-softmax.
        These are the probabilities of a softmax over the target vocabulary (tokens outside the draft vocabulary have probability 0), without
        scattering the logits into it."""
        logits = self.model.logits_processor(self.model.lm_head, normed_hidden)
        top = logits.float().log_softmax(-1).topk(self.cast_params.node_top_k, dim=-1)
        tokens = top.indices.cpu().numpy()
        if self._draft_to_target is not None:
            tokens = tokens + self._draft_to_target[tokens]
        return np.exp(top.values.cpu().numpy().astype(np.float64)), tokens

    def _first_pass(self, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                    token_indices_to_sample, cad: CommonAttentionMetadata, num_rejected_tokens_gpu):
        """vLLM's EAGLE-3 first pass over the verified tokens. Returns the normed and the
        pre-norm draft hidden states at each request's sampled row (``[B, H]`` each), the
        attention metadata and those rows ``[B]``."""
        target_hidden_states = self.model.combine_hidden_states(target_hidden_states)
        num_tokens, sample_rows, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids, target_positions=target_positions,
            target_hidden_states=target_hidden_states, token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        model_kwargs, _ = self.build_model_inputs_first_pass(num_tokens, num_tokens, None)
        with set_forward_context(per_layer, self.vllm_config, num_tokens=num_tokens,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=self._get_slot_mapping(num_tokens, cad.slot_mapping)):
            normed, hidden = self.model(**model_kwargs)
        return normed[sample_rows], hidden[sample_rows], cad, sample_rows

    def _forward_layer(self, frontier: Frontier, drafted: _DraftedNodes, layer_inputs: _LayerInputs,
                       depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one frontier ``[B, W]`` through the draft model under its tree mask (causally
        while the nodes form a chain); updates ``drafted``'s count and ancestors and the
        layers' attention metadata (``layer_inputs.cad``, rewritten per layer as vLLM's chain
        loop does). Returns normed and pre-norm hidden states ``[B * W, H]``."""
        layer_slots, layer_cad = layer_inputs.slots, layer_inputs.cad
        batch, width = frontier.tokens.shape
        before = drafted.count
        plan = None
        if not (drafted.chain and width == 1):
            parent_slot = torch.from_numpy(frontier.parent_slot).clamp_min(0)
            previous = drafted.ancestor_rows(batch)
            rows = torch.zeros(batch, width, before + width, dtype=torch.bool)
            if drafted.offset >= 0:
                rows[:, :, :before] = torch.gather(previous, 1,
                                                   (drafted.offset + parent_slot)[:, :, None].expand(-1, -1, before))
            rows[:, torch.arange(width), before + torch.arange(width)] = True
            grown = torch.zeros(batch, before + width, before + width, dtype=torch.bool)
            grown[:, :before, :before] = previous
            grown[:, before:] = rows
            drafted.ancestors = grown
            plan = TreePlan(tuple(TreeRequest(b, int(layer_slots.prefix[b]), rows[b]) for b in range(batch)))
        drafted.count = before + width

        num_tokens = batch * width
        seq_lens = layer_slots.prefix + (before + width)
        query_start = torch.from_numpy(np.arange(0, num_tokens + 1, width, dtype=np.int32))
        slots = torch.from_numpy(layer_slots.slots[:, before : before + width].reshape(-1)).to(self.device)
        layer_cad.query_start_loc, layer_cad.query_start_loc_cpu = query_start.to(self.device), query_start
        layer_cad.seq_lens = torch.from_numpy(seq_lens).to(self.device)
        layer_cad.num_actual_tokens, layer_cad.max_query_len = num_tokens, width
        layer_cad.max_seq_len, layer_cad.slot_mapping = int(seq_lens.max()), slots
        with active_plan(plan):
            _, per_layer = self.build_per_group_and_layer_attn_metadata(layer_cad, draft_index=depth)

        if drafted.hidden.shape[1] == 1:  # every node's parent is the previous layer's only node
            parent_hidden = drafted.hidden.expand(-1, width, -1)
        else:  # a wider previous layer: no chain, so the mask branch above set parent_slot
            parent_hidden = torch.gather(drafted.hidden, 1, parent_slot.to(self.device)[:, :, None]
                                         .expand(-1, -1, drafted.hidden.shape[-1]))
        self.input_ids[:num_tokens] = torch.from_numpy(frontier.tokens.reshape(-1)).to(self.device)
        self.positions[:num_tokens] = torch.from_numpy(
            np.repeat(layer_slots.root_positions + depth, width)).to(self.device)
        self.hidden_states[:num_tokens] = parent_hidden.reshape(num_tokens, -1)
        with set_forward_context(per_layer, self.vllm_config, num_tokens=num_tokens,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=self._get_slot_mapping(num_tokens, slots)):
            return self.model(input_ids=self.input_ids[:num_tokens], positions=self.positions[:num_tokens],
                              hidden_states=self.hidden_states[:num_tokens])
