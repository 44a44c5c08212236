"""oneDNN matmul kernel caches on CPU, sized for the token counts CAST runs.

vLLM's CPU linear layers (and LM heads) run oneDNN matmuls whose kernel for one input
row count (a "primitive") is created on first use and kept in a per-layer cache of 32
entries. Plain decoding runs a handful of row counts (its batch sizes); CAST runs many
(verified tree sizes, first passes over accepted rows, tree layers), so with 32 entries it
keeps evicting and re-creating them. Measured on a 2-core AMD EPYC with the ``ci``
fixture's target: the first forward at a new row count costs ~7 ms more than the next (a
plain step is ~3 ms), and sweeping 112 row counts again costs 1.28 s with 32 entries
against 1.03 s with 512. CAST's engines therefore get larger caches (~17 MB more for those
112 counts).

Kernels are created as decoding meets their row counts, not in advance: creating every
count decoding could run (1-256 rows, each layer) at start-up made every later forward
slower, the plain ones included. On a 2-core Intel Xeon, one engine per process, 32
requests decoding (a target forward over 32 rows): 3.98-4.04 ms with those kernels set up
against vanilla's 3.26-3.28 ms, 3.40-3.46 ms without against 3.41 ms (greedy B=1/2/4 cells
from a cold engine took as long either way)."""

from __future__ import annotations

PRIMITIVE_CACHE_ENTRIES = 1024
"""oneDNN primitives each CAST matmul keeps (vLLM's default: 32)."""


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

