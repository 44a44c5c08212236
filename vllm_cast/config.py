"""CAST's user-facing configuration and its ``SpeculativeConfig`` subclass.

``{"method": "cast", "model": DRAFT, ...}`` becomes a :class:`CastSpeculativeConfig`:
to vLLM it is an EAGLE-3 config (so draft loading, aux hidden states, the draft KV cache
and lookahead slots work unchanged) and it carries :class:`CastParams`. For CAST,
``num_speculative_tokens`` is the largest number of tree nodes verified per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import Field
from vllm.config import SpeculativeConfig
from vllm.config.utils import config

METHOD_NAME = "cast"
DEFAULT_MAX_TREE_NODES = 32
MAX_TREE_NODES_LIMIT = 128  # vLLM's rejection sampler MAX_SPEC_LEN
ProfileMode = Literal["auto", "force", "never"]
DecisionScope = Literal["batch", "request"]
UtilityMode = Literal["verified", "layer"]
BatchUtility = Literal["mean", "slowest"]


class CastConfigError(ValueError):
    """A bad ``speculative_config`` for method "cast"; the message names the key."""


@dataclass(frozen=True)
class CastParams:
    """CAST's own knobs (the paper's C1/C2/C3, K, R and the cost-table source).

    Thresholds are in expected accepted tokens per unit of normalised cost, the unit being
    one single-token target forward at the current batch size."""

    breadth_threshold: float = 4.0
    """C1: keep widening a layer while marginal utility / marginal draft cost > C1."""
    depth_threshold: float | Literal["auto"] = "auto"
    """C2: draft another layer while alpha * u / c >= C2. "auto" (default): C2 is the step's
    expected tokens per cost so far (1 + expected accepted tokens over first pass + drafted
    layers + verification, in plain-step units), i.e. a layer is drafted while the cost
    model says it raises the step's tokens per second (its draft pass and the verification
    of its nodes against what it is expected to add). The paper's fixed 3.0 assumes draft
    layers that are cheap next to a target step; where one costs ~0.3 of it (this CPU) it
    asks for saturated acceptance estimates and stops trees at depth 1-2."""
    verify_threshold: float = 2.5
    """C3: verify another node while marginal utility / marginal target cost > C3."""
    node_top_k: int = 8
    """Children proposed per expanded node, and the widest a layer can be."""
    max_depth: int = 6
    """Hard cap on draft layers (tree depth below the root)."""
    ratio_buffer_size: int = 4
    """R: how many recent layer-to-layer utility ratios the depth rule averages."""
    acceptance_calibration: bool = True
    """Value nodes by learned acceptance rates instead of raw draft probabilities
    (see vllm_cast.acceptance); False gives EAGLE-2's raw path probabilities."""
    decline_unprofitable: bool = True
    """Drop a step's trees, and stop drafting, when plain decoding is priced faster with
    the measured step overheads (see vllm_cast.step_overheads); False always verifies
    what the thresholds chose (fixed-tree baselines, tests that need trees)."""
    cost_table: str | None = None
    """Path of a cost table (JSON); default: the per-hardware file in the cache."""
    profile: ProfileMode = "auto"
    """auto: profile when no valid table exists; force: always re-profile; never: fail."""
    decision_scope: DecisionScope = "batch"
    """batch: one tree shape per step for the whole batch (the paper); request: per request."""
    expansion_utility: UtilityMode = "verified"
    """layer: a layer's utility is the sum of its kept values (the paper's formula);
    verified: only values that would make the current verify cut count (the official
    code's top-verify_num gain), so drafting stops where verifying more would not pay."""
    batch_utility: BatchUtility = "slowest"
    """How the depth rule (C2) reads a kept layer's utility in batch scope: mean: the batch
    mean (the paper); slowest: that of the request it is worth least to. Requests drafted
    together verify together, so a tree deepened for confident requests costs every step of
    the least predictable one, which then emits a token or two a step at the deep tree's
    price. Greedy, 64 tokens, twelve waves of two requests side by side in one process,
    CAST verifying every tree: mean 1.116x of vanilla, slowest 1.163x (its hardest waves
    0.76-0.88x against 0.67-0.82x); four requests 0.813x against 0.872x."""

    def __post_init__(self) -> None:
        for name, low, high, allow_zero in (
            ("breadth_threshold", 0.0, 1e6, False),
            ("depth_threshold", 0.0, 1e6, True),
            ("verify_threshold", 0.0, 1e6, False),
        ):
            value = getattr(self, name)
            if name == "depth_threshold" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                also = ' or "auto"' if name == "depth_threshold" else ""
                raise CastConfigError(f"speculative_config key '{name}' must be a finite number{also}, got {value!r}")
            if value < low or value > high or (value == low and not allow_zero):
                bound = ">=" if allow_zero else ">"
                raise CastConfigError(f"speculative_config key '{name}' must be {bound} {low} and <= {high:g}, got {value}")
        for name, low, high in (("node_top_k", 1, 16), ("max_depth", 1, 32), ("ratio_buffer_size", 1, 64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CastConfigError(f"speculative_config key '{name}' must be an integer in [{low}, {high}], got {value!r}")
        for name, allowed in (("profile", ProfileMode), ("decision_scope", DecisionScope),
                              ("expansion_utility", UtilityMode), ("batch_utility", BatchUtility)):
            if getattr(self, name) not in get_args(allowed):
                raise CastConfigError(
                    f"speculative_config key '{name}' must be one of {list(get_args(allowed))}, got {getattr(self, name)!r}"
                )
        for name in ("acceptance_calibration", "decline_unprofitable"):
            if not isinstance(getattr(self, name), bool):
                raise CastConfigError(f"speculative_config key '{name}' must be true or false, got {getattr(self, name)!r}")
        if self.cost_table is not None and not isinstance(self.cost_table, str):
            raise CastConfigError(f"speculative_config key 'cost_table' must be a path string, got {self.cost_table!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@config
class CastSpeculativeConfig(SpeculativeConfig):
    """vLLM's EAGLE-3 speculative config plus CAST's parameters (see module doc)."""

    cast: CastParams = Field(default_factory=CastParams)

    def compute_hash(self) -> str:
        cast_key = json.dumps(dataclasses.asdict(self.cast), sort_keys=True).encode()
        return super().compute_hash() + "-cast-" + hashlib.sha256(cast_key).hexdigest()[:16]

    def __repr__(self) -> str:
        model = self.draft_model_config.model if self.draft_model_config else None
        return f"CastSpeculativeConfig(method='cast', model={model!r}, max_tree_nodes={self.num_speculative_tokens}, cast={self.cast})"


def is_cast(speculative_config: Any) -> bool:
    """True when a (possibly None) speculative config is CAST's."""
    return isinstance(speculative_config, CastSpeculativeConfig)


def split_cast_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], CastParams]:
    """Split a ``speculative_config`` dict for method "cast" into the keys vLLM's
    ``SpeculativeConfig`` takes and validated :class:`CastParams`.

    Raises CastConfigError naming the first unknown key or bad value."""
    vllm_keys = {f.name for f in dataclasses.fields(SpeculativeConfig)} - {"target_model_config", "target_parallel_config"}
    cast_keys = CastParams.field_names()
    normalised = {k.replace("-", "_"): v for k, v in raw.items()}
    for key in normalised:
        if key not in vllm_keys and key not in cast_keys:
            raise CastConfigError(
                f"unknown speculative_config key '{key}' for method 'cast'; CAST keys are {sorted(cast_keys)} "
                "and vLLM's SpeculativeConfig keys are accepted too"
            )
    params = CastParams(**{k: normalised.pop(k) for k in list(normalised) if k in cast_keys})
    if normalised.get("model") in (None, ""):
        raise CastConfigError("speculative_config for method 'cast' needs 'model': the EAGLE-3 draft head")
    max_nodes = normalised.setdefault("num_speculative_tokens", DEFAULT_MAX_TREE_NODES)
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or not 1 <= max_nodes <= MAX_TREE_NODES_LIMIT:
        raise CastConfigError(
            f"speculative_config key 'num_speculative_tokens' (CAST: max tree nodes per request) must be an "
            f"integer in [1, {MAX_TREE_NODES_LIMIT}], got {max_nodes!r}"
        )
    normalised["method"] = "eagle3"
    return normalised, params


def check_eagle3_draft(draft: str, target_hf_config: Any) -> None:
    """Refuse a draft checkpoint that is not an EAGLE-3 head for this target.

    Reads the draft's own ``config.json`` (vLLM would silently rename any architecture to
    ``Eagle3...`` and fail later while loading weights)."""
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(draft)
    except (OSError, ValueError) as err:
        raise CastConfigError(f"speculative_config 'model': cannot read the draft config at {draft!r}: {err}") from err
    architectures = raw.get("architectures") or []
    eagle_config = raw.get("eagle_config") or {}
    if not any("Eagle3" in arch for arch in architectures) and not eagle_config.get("use_aux_hidden_state"):
        raise CastConfigError(
            f"speculative_config 'model' {draft!r} is not an EAGLE-3 draft head (architectures={architectures}); "
            "CAST needs a checkpoint such as LlamaForCausalLMEagle3"
        )
    target_vocab = getattr(target_hf_config, "vocab_size", None)
    if raw.get("vocab_size") not in (None, target_vocab):
        raise CastConfigError(
            f"speculative_config 'model' {draft!r} has vocab_size {raw.get('vocab_size')} but the target has {target_vocab}"
        )
    target_hidden = getattr(target_hf_config, "hidden_size", None)
    draft_target_hidden = raw.get("target_hidden_size", raw.get("hidden_size"))
    if draft_target_hidden != target_hidden:
        raise CastConfigError(
            f"speculative_config 'model' {draft!r} expects target hidden size {draft_target_hidden} "
            f"but the target's is {target_hidden}"
        )


def check_cost_table(params: CastParams, target_model_config: Any, draft: str) -> None:
    """Refuse, before any engine starts, a given cost table that is corrupt or was measured
    for other hardware, models, dtype or vLLM (unless profile='force' replaces it)."""
    if params.cost_table is None or params.profile == "force":
        return
    from vllm_cast.cost_model import CostTable, CostTableError, TableKey
    from vllm_cast.cost_tables import table_key

    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = table_key(target_model_config.model, draft, target_model_config.dtype, device)
    try:
        table = CostTable.load(Path(params.cost_table))
        # The worker pins its own thread count; compare the CPU model, not the threads.
        same_device = TableKey(**{**table.key.__dict__, "device": table.key.device.rsplit(":", 1)[0]})
        problem = TableKey(**{**expected.__dict__, "device": expected.device.rsplit(":", 1)[0]}).mismatch(same_device)
    except CostTableError as err:
        raise CastConfigError(f"speculative_config key 'cost_table': {err}") from err
    if problem:
        raise CastConfigError(f"speculative_config key 'cost_table': {params.cost_table} was measured for other "
                              f"hardware or models ({problem}); use profile='force' to re-profile")


def build_cast_speculative_config(raw: dict[str, Any], target_model_config: Any, target_parallel_config: Any) -> CastSpeculativeConfig:
    """Validate ``raw`` (a "cast" speculative_config dict) and build the vLLM config."""
    vllm_kwargs, params = split_cast_keys(raw)
    check_eagle3_draft(str(vllm_kwargs["model"]), target_model_config.hf_config)
    check_cost_table(params, target_model_config, str(vllm_kwargs["model"]))
    return CastSpeculativeConfig(
        cast=params,
        target_model_config=target_model_config,
        target_parallel_config=target_parallel_config,
        **vllm_kwargs,
    )
