"""Shared fixtures: the locally built model pair and real vLLM engines on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU. Set before anything imports triton
    # (vLLM does): triton.language's own helpers are jit-decorated at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CAST_CACHE", str(REPO / ".cache"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096, "seed": 0, "disable_log_stats": False}


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    from vllm_cast.fixtures.build import build_fixture

    return build_fixture("ci")


@pytest.fixture(scope="session")
def target_dir(fixture_dir: Path) -> str:
    return str(fixture_dir / "target")


@pytest.fixture(scope="session")
def draft_dir(fixture_dir: Path) -> str:
    return str(fixture_dir / "eagle3")


def make_llm(target: str, speculative_config: dict | None = None, **overrides):
    """A real offline vLLM engine on the fixture target (float32 so greedy ties are rare)."""
    from vllm import LLM

    return LLM(model=target, speculative_config=speculative_config, **{**ENGINE_KWARGS, **overrides})


def greedy_token_ids(llm, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy completions' token ids, in prompt order."""
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _executor(llm):
    """The model executor of an in-process offline engine."""
    return llm.llm_engine.engine_core.engine_core.model_executor


def model_runner(llm):
    """The model runner of an in-process offline engine (CAST's runner for CAST engines)."""
    return _executor(llm).driver_worker.worker.model_runner


def count_draft_rpcs(llm, run) -> int:
    """Calls of the engine core's ``take_draft_token_ids`` RPC during ``run()``."""
    executor = _executor(llm)
    original = executor.take_draft_token_ids
    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return original()

    executor.take_draft_token_ids = counted
    try:
        run()
    finally:
        del executor.take_draft_token_ids  # the class's method again
    return calls


@pytest.fixture(scope="session")
def vanilla_llm(target_dir: str):
    return make_llm(target_dir)


TREE_THRESHOLDS = {"breadth_threshold": 0.1, "depth_threshold": 0.1, "verify_threshold": 0.1,
                   "decline_unprofitable": False}
"""Low C1/C2/C3 and trees kept even where plain decoding is priced faster: on this CPU a
tree rarely pays for itself (CAST then drafts nothing), but engine tests need wide, deep
trees to exercise the tree path."""


def tree_spec(draft_dir: str, max_nodes: int = 16) -> dict:
    return {"method": "cast", "model": draft_dir, "num_speculative_tokens": max_nodes, **TREE_THRESHOLDS}


def cast_stats(llm) -> dict[str, float]:
    """CAST's decision statistics from the engine's worker."""
    return llm.collective_rpc("cast_stats")[0]


@pytest.fixture(scope="session")
def cast_llm(target_dir: str, draft_dir: str):
    return make_llm(target_dir, tree_spec(draft_dir))


@pytest.fixture(scope="session")
def chain_llm(target_dir: str, draft_dir: str):
    """vLLM's own EAGLE-3 chain on the same pair. Engines live for the whole session: an
    in-process engine's shutdown tears down the distributed state the others share."""
    return make_llm(target_dir, {"method": "eagle3", "model": draft_dir, "num_speculative_tokens": 4})


@pytest.fixture(scope="session")
def default_cast_llm(target_dir: str, draft_dir: str):
    """CAST with the paper's thresholds: on this CPU it mostly chooses not to speculate."""
    return make_llm(target_dir, {"method": "cast", "model": draft_dir, "num_speculative_tokens": 16})
