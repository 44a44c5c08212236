"""Measured latency tables f(B, c, n) for the target and the draft, and their persistence.

A :class:`CostTable` holds, for one (hardware, model pair, dtype, vLLM version), the
median seconds of one forward of each model over a grid of batch sizes ``B``, context
lengths ``c`` (tokens already in the KV cache) and new tokens per sequence ``n``. Look-ups
interpolate linearly between grid points in all three axes and clamp outside the grid.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_cast.version_guard import SUPPORTED_VLLM_VERSION

TABLE_FORMAT = 5
"""Bumped when tables are measured or laid out differently (5: profiled in rounds,
``PROFILE_ROUNDS``, warm, in inference mode); cached tables of another format are re-profiled."""


class CostTableError(ValueError):
    """A cost table that cannot be used here (corrupt, other hardware, other models)."""


def device_name(device: str | torch.device = "cpu") -> str:
    """Stable name of the hardware the table is measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}:{torch.get_num_threads()}threads"


@dataclass(frozen=True)
class TableKey:
    """What a table is valid for; a table is refused when any field differs."""

    device: str
    target_model: str
    draft_model: str
    dtype: str
    vllm_version: str = SUPPORTED_VLLM_VERSION

    def mismatch(self, other: TableKey) -> str | None:
        """Human-readable description of the first differing field, or None."""
        for name in ("device", "target_model", "draft_model", "dtype", "vllm_version"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {theirs!r} in the table but {mine!r} here"
        return None


@dataclass
class StepCosts:
    """Costs at one batch size and context, as functions of tokens per sequence.

    ``draft[n]`` / ``target[n]``: seconds of one forward with ``n`` new tokens per
    sequence, index 0 unused (0.0); length ``max_tokens + 1``. ``target`` and ``draft``
    price trees (masked attention); ``chain_target`` and ``chain_draft`` the causal
    attention a chain (and EAGLE's first pass over the verified tokens) takes; None: same
    as trees."""

    draft: torch.Tensor
    target: torch.Tensor
    chain_target: torch.Tensor | None = None
    chain_draft: torch.Tensor | None = None
    verification_overhead: float = 0.0
    """Seconds of the measured overheads included in ``target[n]`` for ``n >= 2`` beyond
    those in ``target[1]``: the fixed cost of verifying any drafts at all (see
    vllm_cast.step_overheads)."""

    def draft_ratio(self) -> torch.Tensor:
        """Draft cost in units of one single-token target forward, ``[max_tokens + 1]``."""
        return self.draft / self.target[1]

    def target_ratio(self) -> torch.Tensor:
        """Target cost in units of one single-token target forward, ``[max_tokens + 1]``."""
        return self.target / self.target[1]

    def verify_curve(self, chain: bool) -> torch.Tensor:
        """Seconds of verifying a chain (``chain``) or a tree of ``n - 1`` nodes, ``[max_tokens + 1]``."""
        return self.chain_target if chain and self.chain_target is not None else self.target

    def causal_draft_curve(self) -> torch.Tensor:
        """Seconds of a draft forward with ``n`` causal rows per sequence (the first pass)."""
        return self.draft if self.chain_draft is None else self.chain_draft

    def chain_target_ratio(self) -> torch.Tensor:
        """Cost of verifying a chain, same units as :meth:`target_ratio`."""
        return self.verify_curve(chain=True) / self.target[1]

    @functools.cached_property
    def plain_step_seconds(self) -> float:
        """``target[1]``: one single-token target forward (read on every plain step)."""
        return float(self.target[1])

    @functools.cached_property
    def unit_curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`draft_ratio`, :meth:`target_ratio` and :meth:`chain_target_ratio` as
        float64 numpy arrays (computed once per costs object: the tree builder reads them
        every step)."""
        return tuple(curve.numpy().astype(np.float64)
                     for curve in (self.draft_ratio(), self.target_ratio(), self.chain_target_ratio()))

    @functools.cached_property
    def added_verify_units(self) -> dict[bool, np.ndarray]:
        """Target cost, in plain-step units, of verifying ``n`` = 1, 2, ... nodes beyond the
        root, ``[n_max]`` float64, for trees (False) and chains (True), without the fixed
        ``verification_overhead`` (computed once per costs object; see
        :class:`~vllm_cast.tree_builder.LayerRules`)."""
        _, target, chain_target = self.unit_curves
        fixed = self.verification_overhead / self.plain_step_seconds
        return {chain: np.maximum(curve[2:] - curve[1] - fixed, 0.0) for chain, curve in ((False, target),
                                                                                          (True, chain_target))}

    @functools.cached_property
    def seconds(self) -> SecondsCurves:
        """The curves in seconds as float64 numpy arrays (computed once per costs object:
        pricing reads single entries several times a step, which costs a torch op each)."""
        def array(curve: torch.Tensor) -> np.ndarray:
            return curve.numpy().astype(np.float64)

        return SecondsCurves(draft=array(self.draft), causal_draft=array(self.causal_draft_curve()),
                             tree_target=array(self.target), chain_target=array(self.verify_curve(chain=True)))


@dataclass(frozen=True)
class SecondsCurves:
    """A :class:`StepCosts`' curves, seconds per forward with ``n`` tokens per sequence
    ``[max_tokens + 1]`` (float64 numpy): tree-layer draft passes, causal first passes,
    tree and chain verifications."""

    draft: np.ndarray
    causal_draft: np.ndarray
    tree_target: np.ndarray
    chain_target: np.ndarray

    def verify(self, chain: bool) -> np.ndarray:
        """The verification curve of a chain (``chain``) or a tree."""
        return self.chain_target if chain else self.tree_target


def _interp_axis(grid: list[int], value: float) -> tuple[int, int, float]:
    """Indices (lo, hi) and weight of ``hi`` for linear interpolation, clamped."""
    if value <= grid[0]:
        return 0, 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    hi = next(i for i, g in enumerate(grid) if g >= value)
    lo = hi - 1
    return lo, hi, (value - grid[lo]) / (grid[hi] - grid[lo])


@dataclass
class CostTable:
    """Latency grids ``[len(batch_sizes), len(contexts), len(new_tokens)]`` in seconds.

    ``target_seconds``: target forwards whose new tokens form a tree (masked attention);
    ``chain_target_seconds``: the same through the causal path a chain takes (None where
    both paths cost the same); ``draft_seconds``: draft forwards (one token per sequence
    causal, more under a tree mask, as CAST drafts tree layers); ``chain_draft_seconds``:
    draft forwards with causal rows (EAGLE's first pass over the verified tokens; None:
    priced as ``draft_seconds``)."""

    key: TableKey
    batch_sizes: list[int]
    contexts: list[int]
    new_tokens: list[int]
    target_seconds: torch.Tensor
    draft_seconds: torch.Tensor
    chain_target_seconds: torch.Tensor | None = None
    chain_draft_seconds: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.batch_sizes), len(self.contexts), len(self.new_tokens))
        for name in ("target_seconds", "draft_seconds", "chain_target_seconds", "chain_draft_seconds"):
            grid = getattr(self, name)
            if grid is None and name.startswith("chain_"):
                continue
            if tuple(grid.shape) != shape:
                raise CostTableError(f"{name} has shape {tuple(grid.shape)}, expected {shape}")
            if not torch.isfinite(grid).all() or (grid <= 0).any():
                raise CostTableError(f"{name} holds non-positive or non-finite latencies")
        for name in ("batch_sizes", "contexts", "new_tokens"):
            axis = getattr(self, name)
            if not axis or sorted(set(axis)) != list(axis):
                raise CostTableError(f"{name} must be a non-empty strictly increasing list, got {axis}")
        if self.new_tokens[0] != 1:
            raise CostTableError("new_tokens must start at 1 (the single-token decode step)")

    def _lookup(self, grid: torch.Tensor, batch_size: float, context: float, tokens: float) -> float:
        b = _interp_axis(self.batch_sizes, batch_size)
        c = _interp_axis(self.contexts, context)
        n = _interp_axis(self.new_tokens, tokens)
        total = 0.0
        for bi, bw in ((b[0], 1 - b[2]), (b[1], b[2])):
            for ci, cw in ((c[0], 1 - c[2]), (c[1], c[2])):
                for ni, nw in ((n[0], 1 - n[2]), (n[1], n[2])):
                    total += bw * cw * nw * float(grid[bi, ci, ni])
        return total

    def target(self, batch_size: float, context: float, tokens: float) -> float:
        """Seconds of one target forward: ``batch_size`` sequences of ``context`` cached
        tokens, ``tokens`` new tokens each."""
        return self._lookup(self.target_seconds, batch_size, context, tokens)

    def chain_target(self, batch_size: float, context: float, tokens: float) -> float:
        """Seconds of one target forward verifying chains (causal attention)."""
        grid = self.target_seconds if self.chain_target_seconds is None else self.chain_target_seconds
        return self._lookup(grid, batch_size, context, tokens)

    def draft(self, batch_size: float, context: float, tokens: float) -> float:
        """Seconds of one draft forward, same arguments as :meth:`target`."""
        return self._lookup(self.draft_seconds, batch_size, context, tokens)

    def chain_draft(self, batch_size: float, context: float, tokens: float) -> float:
        """Seconds of one draft forward over causal rows (the first pass)."""
        grid = self.draft_seconds if self.chain_draft_seconds is None else self.chain_draft_seconds
        return self._lookup(grid, batch_size, context, tokens)

    def at(self, batch_size: int, context: float, max_tokens: int) -> StepCosts:
        """The four cost curves (draft, target, chain target, chain draft) at one (batch, context),
        for 1..``max_tokens`` tokens."""
        curves = {name: self._curve(grid, batch_size, context, max_tokens) for name, grid in (
            ("draft", self.draft_seconds), ("target", self.target_seconds),
            ("chain_target", self.target_seconds if self.chain_target_seconds is None else self.chain_target_seconds),
            ("chain_draft", self.draft_seconds if self.chain_draft_seconds is None else self.chain_draft_seconds))}
        return StepCosts(**curves)

    def _curve(self, grid: torch.Tensor, batch_size: float, context: float, max_tokens: int) -> torch.Tensor:
        """``[max_tokens + 1]`` float64 seconds of ``grid`` at one (batch, context) for 0..``max_tokens``
        new tokens (index 0: 0), interpolated as :meth:`_lookup` does, all token counts at once."""
        b, c = _interp_axis(self.batch_sizes, batch_size), _interp_axis(self.contexts, context)
        plane = sum(bw * cw * grid[bi, ci].double().numpy()
                    for bi, bw in ((b[0], 1 - b[2]), (b[1], b[2])) for ci, cw in ((c[0], 1 - c[2]), (c[1], c[2])))
        seconds = np.interp(np.arange(1, max_tokens + 1), self.new_tokens, plane)
        return torch.from_numpy(np.concatenate([[0.0], seconds]))

    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "key": self.key.__dict__,
            "batch_sizes": self.batch_sizes,
            "contexts": self.contexts,
            "new_tokens": self.new_tokens,
            "target_seconds": self.target_seconds.tolist(),
            "draft_seconds": self.draft_seconds.tolist(),
            **{name: None if getattr(self, name) is None else getattr(self, name).tolist()
               for name in ("chain_target_seconds", "chain_draft_seconds")},
            "meta": self.meta,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, expected: TableKey | None = None) -> CostTable:
        """Read a table; refuse it (CostTableError) if corrupt or made for another key. Its
        grids are raised where adding tokens costs a batch size less than a smaller one
        (``additions_grow_with_batch``; tables saved before that rule get it on reading)."""
        try:
            blob = json.loads(Path(path).read_text())
            if blob.get("format") != TABLE_FORMAT:
                raise CostTableError(f"cost table {path} has format {blob.get('format')}, expected {TABLE_FORMAT}")
            table = cls(
                key=TableKey(**blob["key"]),
                batch_sizes=list(blob["batch_sizes"]),
                contexts=list(blob["contexts"]),
                new_tokens=list(blob["new_tokens"]),
                target_seconds=_grid(blob["target_seconds"]),
                draft_seconds=_grid(blob["draft_seconds"]),
                **{name: None if blob.get(name) is None else _grid(blob[name])
                   for name in ("chain_target_seconds", "chain_draft_seconds")},
                meta=blob.get("meta", {}),
            )
        except CostTableError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise CostTableError(f"cost table {path} is unreadable or corrupt: {err}") from err
        if expected is not None:
            problem = expected.mismatch(table.key)
            if problem:
                raise CostTableError(
                    f"cost table {path} was measured for other hardware or models ({problem}); "
                    "re-profile with speculative_config profile='force' or point cost_table elsewhere"
                )
        return table


ForwardTimer = Callable[[int, int, int], float]
"""(batch_size, context, new_tokens) -> seconds of one forward."""

PROFILE_ROUNDS = 3
"""Passes over the whole grid when profiling; a cell's cost is the median of its rounds.
Timing each cell's repeats back to back put all of them in whatever state the machine was
in for those few milliseconds: the 2-core EPYC runs 1.3-2x slower for seconds at a time (a
busy neighbour), and two tables profiled minutes apart differed by up to 35% per cell,
unevenly (plain B=1 9% apart, 32-token verification 31%), so measured step times drifted
against some cells and not others. Rounds put a cell's samples ~15 s apart."""


def monotone_from_below(grid: torch.Tensor) -> torch.Tensor:
    """The largest grid ``<= grid`` that never decreases along any axis (batch size,
    context, new tokens): each cell becomes the minimum over the cells at least as large
    on every axis. A forward never gets cheaper with more sequences, context or tokens, so
    a cell above a larger one is timing noise (a stall during its few repeats); lowering it
    keeps one slow sample from pricing, say, every plain step of a batch size."""
    for axis in range(grid.dim()):
        grid = grid.flip(axis).cummin(axis).values.flip(axis)
    return grid


def _grid(cells: list) -> torch.Tensor:
    """A saved latency grid (nested lists, seconds) as read: float64, raised by
    ``additions_grow_with_batch``."""
    return additions_grow_with_batch(torch.tensor(cells, dtype=torch.float64))


def additions_grow_with_batch(grid: torch.Tensor) -> torch.Tensor:
    """The smallest grid ``>= grid`` (raised where needed) in which adding new tokens costs
    each batch size at least what it costs the next smaller one, per context:
    ``grid[i, :, k] - grid[i, :, k - 1] >= grid[i - 1, :, k] - grid[i - 1, :, k - 1]`` (axes:
    batch sizes ascending, contexts, new tokens ascending), kept non-decreasing along the
    context axis. Going from ``n`` to ``m`` new tokens adds ``(m - n)`` rows per sequence, so
    more sequences add at least as many rows. A cell below that is timing noise on the fast
    side, which ``monotone_from_below`` cannot see: the 2-core EPYC's profile priced causal
    verification of 2 tokens at B=32 at 9.51 ms against 9.48 ms for 1 token, where B=16 paid
    6.90 against 4.84 ms and such B=32 steps measured 12.3 ms against 8.6 ms plain."""
    grid = grid.clone()
    for i in range(1, grid.shape[0]):
        for k in range(1, grid.shape[2]):
            floor = grid[i, :, k - 1] + grid[i - 1, :, k] - grid[i - 1, :, k - 1]
            grid[i, :, k] = torch.maximum(grid[i, :, k], floor).cummax(0).values
    return grid


def profile_table(key: TableKey, time_target: ForwardTimer, time_draft: ForwardTimer, batch_sizes: list[int],
                  contexts: list[int], new_tokens: list[int], time_chain_target: ForwardTimer | None = None,
                  time_chain_draft: ForwardTimer | None = None, progress: bool = True) -> CostTable:
    """Measure the models over the grid with the given timers, ``PROFILE_ROUNDS`` passes
    over every cell, each cell's median kept (progress bar on stderr); ``time_chain_target``
    / ``time_chain_draft`` (optional) time causal forwards (chains, the first draft pass);
    single-token forwards are causal anyway and timed once."""
    from tqdm import tqdm

    shape = (len(batch_sizes), len(contexts), len(new_tokens))
    cells = [(i, j, k) for i in range(shape[0]) for j in range(shape[1]) for k in range(shape[2])]
    timers = {"target": time_target, "draft": time_draft, "chain": time_chain_target, "chain_draft": time_chain_draft}
    timers = {name: timer for name, timer in timers.items() if timer is not None}
    causal_once = {"chain": "target", "chain_draft": "draft"}  # single-token forwards are causal anyway
    # Per model: seconds [rounds, batch sizes, contexts, new tokens].
    samples = {name: torch.zeros((PROFILE_ROUNDS, *shape), dtype=torch.float64) for name in timers}
    progress_bar = tqdm(total=PROFILE_ROUNDS * len(cells), desc="profile cost table", unit="cell", disable=not progress)
    for round_index in range(PROFILE_ROUNDS):
        for i, j, k in cells:
            b, c, n = batch_sizes[i], contexts[j], new_tokens[k]
            for name, timer in timers.items():  # "target" and "draft" come before their causal twins
                timed_by = causal_once.get(name) if n == 1 else None
                samples[name][round_index, i, j, k] = (samples[timed_by][round_index, i, j, k] if timed_by
                                                       else timer(b, c, n))
            progress_bar.update()
    progress_bar.close()
    target, draft, chain, chain_draft = (samples[name].median(dim=0).values if name in samples else None
                                         for name in ("target", "draft", "chain", "chain_draft"))
    target, draft, chain, chain_draft = (None if grid is None else additions_grow_with_batch(monotone_from_below(grid))
                                         for grid in (target, draft, chain, chain_draft))
    return CostTable(key, list(batch_sizes), list(contexts), list(new_tokens), target, draft, chain, chain_draft)
