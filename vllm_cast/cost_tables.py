"""Where CAST's cost table comes from: an explicit file, the per-hardware cache, or a
fresh profile through the engine; and the per-step cost lookup the proposer uses."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
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


def _key_digest(key: TableKey) -> str:
    return hashlib.sha256(json.dumps(key.__dict__, sort_keys=True).encode()).hexdigest()[:16]


def default_table_path(key: TableKey, max_tokens: int, max_batch: int) -> Path:
    """The cache file for a key profiled for engines of up to ``max_batch`` sequences and
    ``max_tokens`` new tokens per sequence: one table per hardware, model pair, dtype and
    coverage, so engines of different sizes keep their own tables instead of replacing
    each other's on every start."""
    return cache_root() / "cost_tables" / f"{_key_digest(key)}-b{max_batch}-t{max_tokens}.json"


def _covering_cached_tables(key: TableKey, max_tokens: int, max_batch: int) -> list[Path]:
    """Cached tables of ``key`` whose coverage (from their names) includes this engine's,
    smallest first."""
    covering = []
    for path in (cache_root() / "cost_tables").glob(f"{_key_digest(key)}-b*-t*.json"):
        coverage = re.fullmatch(r"[0-9a-f]+-b(\d+)-t(\d+)", path.stem)
        if coverage and int(coverage[1]) >= max_batch and int(coverage[2]) >= max_tokens:
            covering.append((int(coverage[1]), int(coverage[2]), path))
    return [path for *_, path in sorted(covering)]


def _load_covering(path: Path, key: TableKey, max_tokens: int, max_batch: int) -> CostTable:
    """The table at ``path`` if it is ``key``'s and covers ``max_tokens`` new tokens and
    batches of ``max_batch`` sequences (else CostTableError)."""
    table = CostTable.load(path, expected=key)
    if table.new_tokens[-1] < max_tokens:
        raise CostTableError(f"cost table {path} covers {table.new_tokens[-1]} new tokens per sequence, "
                             f"CAST needs {max_tokens}; re-profile with profile='force'")
    if table.batch_sizes[-1] < max_batch:
        raise CostTableError(f"cost table {path} covers batches up to {table.batch_sizes[-1]} sequences, "
                             f"this engine runs {max_batch}; re-profile with profile='force'")
    return table


def resolve_table(params: CastParams, key: TableKey, profile: Callable[[], CostTable], max_tokens: int,
                  max_batch: int = 1) -> CostTable:
    """The cost table to use, per ``params.profile`` (auto: load a valid table or profile
    and save one; force: profile and save; never: load or fail). An explicit
    ``params.cost_table`` for another key, corrupt, or not covering ``max_tokens`` new tokens
    or batches of ``max_batch`` sequences (profiled for a smaller engine) is refused
    (CostTableError). Without one, the smallest cached table of this key that covers the
    engine is used; unusable cached tables are skipped (and replaced by profiling unless
    ``profile='never'``)."""
    if params.cost_table:
        path = Path(params.cost_table)
        if params.profile != "force":
            if path.exists():
                return _load_covering(path, key, max_tokens, max_batch)
            if params.profile == "never":
                raise CostTableError(f"no cost table at {path} and speculative_config profile='never'")
    else:
        path = default_table_path(key, max_tokens, max_batch)
        if params.profile != "force":
            for cached in _covering_cached_tables(key, max_tokens, max_batch):
                try:
                    table = _load_covering(cached, key, max_tokens, max_batch)
                except CostTableError as error:
                    logger.warning("CAST: cached cost table %s is unusable (%s)", cached, error)
                    continue
                logger.info("CAST: cost table %s", cached)
                return table
            if params.profile == "never":
                raise CostTableError(f"no cached cost table covering this engine under {path.parent} "
                                     f"and speculative_config profile='never'")
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
