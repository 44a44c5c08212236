"""Where CAST's cost table comes from: an explicit file, the per-hardware cache, or a
fresh profile through the engine; and the per-step cost lookup the proposer uses."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_cast.config import CastParams
from vllm_cast.cost_model import (
    CostTable,
    CostTableError,
    StepCosts,
    TableKey,
    device_name,
)
from vllm_cast.fixtures.build import cache_root

logger = logging.getLogger("vllm_cast")
CONTEXT_BUCKET = 64
"""Step costs are looked up at the mean context rounded to this many tokens."""


def table_key(target_model: str, draft_model: str, dtype: torch.dtype | str, device: str | torch.device) -> TableKey:
    return TableKey(device=device_name(device), target_model=str(target_model), draft_model=str(draft_model),
                    dtype=str(dtype).removeprefix("torch."))


def default_table_path(key: TableKey) -> Path:
    """The cache file for a key: one table per hardware, model pair, dtype and vLLM."""
    digest = hashlib.sha256(json.dumps(key.__dict__, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "cost_tables" / f"{digest}.json"


def resolve_table(params: CastParams, key: TableKey, profile: Callable[[], CostTable], max_tokens: int,
                  max_batch: int = 1) -> CostTable:
    """The cost table to use, per ``params.profile`` (auto: load a valid table or profile
    and save one; force: profile and save; never: load or fail). A table for another key,
    a corrupt one, or one not covering ``max_tokens`` new tokens or batches of ``max_batch``
    sequences (it was profiled for a smaller engine) is refused (CostTableError) unless
    profiling is allowed, in which case it is replaced."""
    path = Path(params.cost_table) if params.cost_table else default_table_path(key)
    if params.profile != "force" and path.exists():
        try:
            table = CostTable.load(path, expected=key)
            if table.new_tokens[-1] < max_tokens:
                raise CostTableError(f"cost table {path} covers {table.new_tokens[-1]} new tokens per sequence, "
                                     f"CAST needs {max_tokens}; re-profile with profile='force'")
            if table.batch_sizes[-1] < max_batch:
                raise CostTableError(f"cost table {path} covers batches up to {table.batch_sizes[-1]} sequences, "
                                     f"this engine runs {max_batch}; re-profile with profile='force'")
            logger.info("CAST: cost table %s", path)
            return table
        except CostTableError:
            if params.profile == "never" or params.cost_table:
                raise
            logger.warning("CAST: cached cost table %s is unusable; re-profiling", path)
    elif params.profile == "never":
        raise CostTableError(f"no cost table at {path} and speculative_config profile='never'")
    table = profile()
    table.save(path)
    logger.info("CAST: profiled cost table saved to %s", path)
    return table


def cost_source(table: CostTable, max_tokens: int) -> Callable[[int, float], StepCosts]:
    """Step costs for (batch size, mean context), memoised per context bucket."""

    @functools.lru_cache(maxsize=4096)
    def at(batch_size: int, context_bucket: int) -> StepCosts:
        return table.at(batch_size, context_bucket * CONTEXT_BUCKET, max_tokens)

    return lambda batch_size, context: at(batch_size, round(context / CONTEXT_BUCKET))
