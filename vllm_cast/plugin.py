"""The ``vllm.general_plugins`` entry point: teach vLLM the speculative method "cast".

vLLM calls :func:`register` in every process (API server, engine core, workers) before
it builds or unpickles the engine config. It must stay idempotent and cheap."""

from __future__ import annotations

import functools
from typing import Any

_REGISTERED = False


def _cast_requested(engine_args: Any) -> bool:
    raw = engine_args.speculative_config or {}
    return (raw.get("method") or engine_args.spec_method) == "cast"


def _merged_cli_spec(engine_args: Any) -> dict[str, Any]:
    """The speculative_config dict with ``--spec-method/--spec-model/--spec-tokens`` folded
    in, as vLLM does, without mutating the engine args."""
    raw = dict(engine_args.speculative_config or {})
    for flag, key, value in (
        ("--spec-method", "method", engine_args.spec_method),
        ("--spec-model", "model", engine_args.spec_model),
        ("--spec-tokens", "num_speculative_tokens", engine_args.spec_tokens),
    ):
        if value is None:
            continue
        if key in raw and raw[key] != value:
            raise ValueError(f"{flag} and --speculative-config['{key}'] are mutually exclusive")
        raw[key] = value
    raw.pop("method", None)
    return raw


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config

    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        if not _cast_requested(self):
            return original(self, target_model_config, target_parallel_config)
        from vllm_cast.config import build_cast_speculative_config

        return build_cast_speculative_config(_merged_cli_spec(self), target_model_config, target_parallel_config)

    EngineArgs.create_speculative_config = create_speculative_config


CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
CAST_CPU_WORKER = "vllm_cast.worker.CastCPUWorker"


def _patch_engine_config() -> None:
    """Route CAST engines to CAST's worker (CPU); elsewhere keep EAGLE-3 chains, loudly."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        engine_config = original(self, *args, **kwargs)
        from vllm_cast.config import is_cast

        if not is_cast(engine_config.speculative_config):
            return engine_config
        parallel = engine_config.parallel_config
        if parallel.worker_cls == CPU_WORKER:
            parallel.worker_cls = CAST_CPU_WORKER
        elif parallel.worker_cls != CAST_CPU_WORKER:
            import logging

            logging.getLogger("vllm_cast").warning(
                "CAST trees run on vLLM's CPU platform so far; worker %s drafts EAGLE-3 chains of "
                "num_speculative_tokens instead", parallel.worker_cls)
        return engine_config

    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    """Entry point (group ``vllm.general_plugins``, name ``cast``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm_cast  # noqa: F401  (version guard)
    from vllm_cast import draft_delivery

    _patch_engine_args()
    _patch_engine_config()
    draft_delivery.install()
    _REGISTERED = True
