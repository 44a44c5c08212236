"""Draft tokens delivered with the step's model output: one engine-to-worker round trip
less per step.

Without async scheduling (vLLM's CPU platform never has it), vLLM's engine core asks the
worker for the step's draft tokens in a separate RPC after every step
(``EngineCore.post_step`` -> ``take_draft_token_ids``), even when nothing was drafted. In
a served engine the worker is another process, and on the 2-core CPU that round trip
through vLLM's shared-memory queue (both sides spin) was 6.6% of the engine core's time
under 4 streaming clients. CAST's runner attaches the drafts to the output it returns
anyway (:class:`CastModelRunnerOutput`); the scheduler takes them on with the output, in
the order vLLM would, and the engine skips the RPC for that step. An output without them
(any engine not running CAST's runner) keeps vLLM's path."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput


@dataclass
class CastModelRunnerOutput(ModelRunnerOutput):
    """vLLM's model output plus the drafts the runner proposed this step."""

    draft_token_ids: DraftTokenIds | None = None
    """What ``take_draft_token_ids`` would have returned (None: no drafts this step)."""


def with_drafts(output: Any, drafts: DraftTokenIds | None) -> Any:
    """A copy of a ``ModelRunnerOutput`` carrying ``drafts`` (vLLM shares some outputs,
    e.g. the empty one, so the original is never changed); outputs of other kinds (async,
    pipeline-parallel intermediates) as they are, their drafts left to vLLM's RPC."""
    if type(output) is not ModelRunnerOutput:
        return output
    carrying = object.__new__(CastModelRunnerOutput)  # a field-for-field copy (no __init__ call)
    carrying.__dict__.update(output.__dict__)
    carrying.draft_token_ids = drafts
    return carrying


_DRAFTS_TAKEN = "_cast_drafts_taken"
"""Scheduler attribute: this step's drafts came with its output (post_step skips its RPC)."""


def install() -> None:
    """Patch vLLM's scheduler to take drafts from a :class:`CastModelRunnerOutput` and the
    engine core to skip ``take_draft_token_ids`` after such a step. Idempotent."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    if getattr(Scheduler.update_from_output, "cast_patched", False):
        return
    update_from_output = Scheduler.update_from_output
    post_step = EngineCore.post_step

    @functools.wraps(update_from_output)
    def update_taking_drafts(self, scheduler_output, model_runner_output):
        outputs = update_from_output(self, scheduler_output, model_runner_output)
        carried = isinstance(model_runner_output, CastModelRunnerOutput)
        if carried and model_runner_output.draft_token_ids is not None:
            self.update_draft_token_ids(model_runner_output.draft_token_ids)
        setattr(self, _DRAFTS_TAKEN, carried)
        return outputs

    @functools.wraps(post_step)
    def post_step_unless_taken(self, model_executed: bool) -> None:
        if getattr(self.scheduler, _DRAFTS_TAKEN, False):
            setattr(self.scheduler, _DRAFTS_TAKEN, False)
            return
        post_step(self, model_executed)

    update_taking_drafts.cast_patched = True
    Scheduler.update_from_output = update_taking_drafts
    EngineCore.post_step = post_step_unless_taken
