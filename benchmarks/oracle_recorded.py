"""CAST's tree choice against the exhaustively best tree, on draft distributions recorded
from the real EAGLE-3 head inside vLLM and on the cost table CAST profiled on this machine.

The engine drafts full trees (top-3 children, 2 layers, raw probabilities) while a recording
builder keeps the draft distribution of every expanded path of the first request; offline,
``vllm_cast.oracle`` scores CAST's tree and the best tree on each recorded step.

``python -m benchmarks.oracle_recorded [--steps N] [--out DIR]`` writes ``oracle.json``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch

from vllm_cast import proposer
from vllm_cast.config import CastParams
from vllm_cast.cost_model import StepCosts
from vllm_cast.oracle import best_tree, cast_tree
from vllm_cast.tree_builder import CastTreeBuilder, Frontier

TOP_K, LAYERS = 3, 2  # the engine expands every node of layer 1, so the oracle may pick any widths
RECORDING = {"node_top_k": TOP_K, "max_depth": LAYERS, "breadth_threshold": 1e-9, "depth_threshold": 0.0,
             "verify_threshold": 1e-9, "acceptance_calibration": False, "expansion_utility": "layer",
             "num_speculative_tokens": 16}


class RecordingTreeBuilder(CastTreeBuilder):
    """Keeps ``path -> draft distribution [V]`` for every path it expands (request 0): the
    top-K the proposer hands over, zero elsewhere (all the oracle reads of it)."""

    recorded: ClassVar[list[dict[tuple[int, ...], torch.Tensor]]] = []
    vocab_size: ClassVar[int] = 0

    def _follow(self, frontier: Frontier | None) -> Frontier | None:
        if frontier is not None:
            self._paths = [(self._paths[s] if s >= 0 else ()) + (t,)
                           for t, s in zip(frontier.tokens[0].tolist(), frontier.parent_slot[0].tolist())]
        return frontier

    @classmethod
    def _distribution(cls, probs: np.ndarray, tokens: np.ndarray) -> torch.Tensor:
        """Sparse distribution ``[V]`` holding one node's top-K probabilities."""
        distribution = torch.zeros(cls.vocab_size, dtype=torch.float64)
        distribution[torch.from_numpy(tokens)] = torch.from_numpy(probs)
        return distribution

    def start_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        self._paths: list[tuple[int, ...]] = []
        self._record = {(): self._distribution(probs[0], tokens[0])}
        return self._follow(super().start_top(probs, tokens))

    def expand_top(self, probs: np.ndarray, tokens: np.ndarray) -> Frontier | None:
        self._record.update({path: self._distribution(probs[0, w], tokens[0, w]) for w, path in enumerate(self._paths)})
        return self._follow(super().expand_top(probs, tokens))

    def finish(self, *args, **kwargs):
        RecordingTreeBuilder.recorded.append(self._record)
        return super().finish(*args, **kwargs)


def record(steps: int) -> tuple[list[dict], StepCosts]:
    """Recorded distributions of ``steps`` drafting steps (batch 1) and the step costs the
    engine's cost table gives at batch 1 and their mean context."""
    from vllm import LLM, SamplingParams

    from vllm_cast.fixtures.build import build_fixture
    from vllm_cast.prompts import TASKS, load_prompts

    fixture = build_fixture("ci")
    proposer.CastTreeBuilder = RecordingTreeBuilder
    RecordingTreeBuilder.vocab_size = json.loads((fixture / "target" / "config.json").read_text())["vocab_size"]
    llm = LLM(model=str(fixture / "target"), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              speculative_config={"method": "cast", "model": str(fixture / "eagle3"), **RECORDING})
    prompts = [load_prompts(task, limit=2)[1] for task in TASKS]
    for prompt in prompts:
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max(8, steps // len(prompts) + 2)),
                     use_tqdm=False)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return RecordingTreeBuilder.recorded[:steps], runner.drafter.cost_source(1, 256.0)


def memory_bound(costs: StepCosts) -> StepCosts:
    """A GPU-like batch-1 regime for comparison: verify nearly flat, draft ~8% of a step."""
    n = torch.arange(costs.target.numel(), dtype=torch.float64)
    return StepCosts(draft=torch.where(n > 0, 0.08 + 0.002 * n, 0.0), target=torch.where(n > 0, 1.0 + 0.004 * n, 0.0))


def compare(recorded: list[dict], costs: StepCosts, params: CastParams) -> dict[str, float]:
    ratios, plain = [], 0
    for distributions in recorded:
        def draft(path: tuple[int, ...], table=distributions) -> torch.Tensor:
            return table[path]

        best = best_tree(draft, costs, top_k=TOP_K, max_layers=LAYERS, max_nodes=16)
        ours = cast_tree(draft, costs, params, max_nodes=16)
        ratios.append(ours.tokens_per_second / best.tokens_per_second)
        plain += best.verified == 0
    return {"mean_ratio": statistics.fmean(ratios), "min_ratio": min(ratios), "steps": len(ratios),
            "best_is_plain_decoding": plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_small"))
    args = parser.parse_args()
    recorded, measured = record(args.steps)
    results = {}
    for cost_name, costs in (("measured_cpu", measured), ("memory_bound", memory_bound(measured))):
        for label, thresholds in (("paper_thresholds", {}), ("thresholds_1", {
                "breadth_threshold": 1.0, "depth_threshold": 1.0, "verify_threshold": 1.0})):
            params = CastParams(node_top_k=TOP_K, max_depth=LAYERS, acceptance_calibration=False, **thresholds)
            results[f"{cost_name}/{label}"] = compare(recorded, costs, params)
            print(cost_name, label, results[f"{cost_name}/{label}"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oracle.json").write_text(json.dumps(results, indent=1))
    os._exit(0)


if __name__ == "__main__":
    main()
