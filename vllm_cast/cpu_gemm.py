"""oneDNN matmul kernels on CPU, sized for the token counts CAST runs.

vLLM's CPU linear layers (and LM heads) run oneDNN matmuls whose kernel for one input
row count (a "primitive") is created on first use and kept in a per-layer cache of 32
entries. Plain decoding runs a handful of row counts (its batch sizes); CAST runs many
(verified tree sizes, first passes over accepted rows, tree layers), so with 32 entries it
keeps evicting and re-creating them. Measured on the 2-core CPU with the ``ci`` fixture's
target: the first forward at a new row count costs ~7 ms more than the next (a plain step
is ~3 ms), and sweeping 112 row counts again costs 1.28 s with 32 entries against 1.03 s
with 512. CAST's engines therefore get larger caches (~17 MB more for those 112 counts)
and create the kernels of the row counts decoding uses at start-up."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tqdm import tqdm

logger = logging.getLogger("vllm_cast")

PRIMITIVE_CACHE_ENTRIES = 1024
"""oneDNN primitives each CAST matmul keeps (vLLM's default: 32)."""

WARMED_ROWS_CAP = 256
"""Most row counts set up at start-up (each costs one target and one draft forward)."""


def enlarge_primitive_caches() -> None:
    """Make every oneDNN matmul vLLM creates from now on (at model load) keep
    ``PRIMITIVE_CACHE_ENTRIES`` primitives. Idempotent; a no-op where vLLM has no oneDNN."""
    from vllm import _custom_ops as ops

    create = getattr(ops, "create_onednn_mm", None)
    if create is None or getattr(create, "cast_enlarged", False):
        return

    def create_enlarged(weight, primitive_cache_size: int = 128):
        return create(weight, max(primitive_cache_size, PRIMITIVE_CACHE_ENTRIES))

    create_enlarged.cast_enlarged = True
    ops.create_onednn_mm = create_enlarged


def decode_row_counts(max_num_seqs: int, max_depth: int, max_num_batched_tokens: int) -> range:
    """Row counts decoding steps run: up to every request verifying or re-reading a
    ``max_depth`` path plus its root and bonus token, capped at ``WARMED_ROWS_CAP``."""
    return range(1, min(max_num_seqs * (max_depth + 2), max_num_batched_tokens, WARMED_ROWS_CAP) + 1)


def warm_row_counts(run_once: Callable[[int], None], counts: range) -> None:
    """Set up the kernels of every row count in ``counts`` by running ``run_once(rows)``
    (a target and a draft forward of that many rows)."""
    for rows in tqdm(counts, desc="set up CPU matmul kernels", unit="shape", leave=False):
        run_once(rows)
    logger.info("CAST: set up matmul kernels for %d-%d rows", counts.start, counts.stop - 1)
