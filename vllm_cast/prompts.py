"""The six EAGLE/CAST task prompt sets shipped in ``vllm_cast/data/eagle_tasks``."""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "data" / "eagle_tasks"
TASKS = ("mt_bench", "humaneval", "gsm8k", "alpaca", "sum", "qa")


def first_turn(record: dict) -> str:
    """The prompt text of one question record (first turn for multi-turn sets)."""
    turns = record.get("turns")
    return turns[0] if turns else record.get("prompt") or record["question"]


def load_prompts(task: str, limit: int | None = None) -> list[str]:
    """First-turn prompts of ``task`` in file order, at most ``limit``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    lines = (TASKS_DIR / task / "question.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [first_turn(json.loads(line)) for line in lines if line.strip()]
    return prompts[:limit]
