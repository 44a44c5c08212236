"""The benchmark's derived rows (benchmarks.speedup): speedups and the best EAGLE-3 chain; its
per-step counts (benchmarks.decode_steps); the server benchmark's speculation counters
(benchmarks.serve_load)."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.allocator import PINNED_HEAP_ENV, pin_heap_for_child_processes
from benchmarks.decode_steps import DecodeCount
from benchmarks.serve_load import SPEC_COUNTERS, level_requests, output_lengths, speculation_summary
from benchmarks.speedup import add_derived


def _row(config: str, task: str, batch: int, tokens_per_s: float) -> dict:
    return {"config": config, "task": task, "temperature": 0.0, "batch_size": batch, "tokens_per_s": tokens_per_s}


def test_the_best_chain_is_one_setting_per_batch_size_not_one_per_task():
    """K=4 wins one task by far and loses the other; K=1 is the better single setting over
    both, so it stands for the chain in both cells, per-task winners notwithstanding."""
    rows = [_row("vanilla", "code", 1, 100.0), _row("vanilla", "chat", 1, 100.0),
            _row("eagle3_chain_k1", "code", 1, 120.0), _row("eagle3_chain_k1", "chat", 1, 105.0),
            _row("eagle3_chain_k4", "code", 1, 150.0), _row("eagle3_chain_k4", "chat", 1, 60.0)]
    best = {row["task"]: row for row in add_derived(rows) if row["config"] == "eagle3_chain_best"}
    assert {task: row["chain_k"] for task, row in best.items()} == {"code": 1, "chat": 1}
    assert abs(best["code"]["speedup"] - 1.2) < 1e-9 and abs(best["chat"]["speedup"] - 1.05) < 1e-9


def test_undrafted_steps_count_in_tokens_per_step_but_not_in_accepted_length():
    """One request, 40 tokens: its prompt step's token, then 15 decode steps of which 10
    verified drafts; the other 5 emitted one token each, so the 10 drafted steps emitted 34,
    24 of them accepted draft tokens."""
    count = DecodeCount(tokens=40, requests=1, decode_steps=15)
    assert abs(count.tokens_per_step - 39 / 15) < 1e-9
    assert abs(count.accepted_per_draft(10) - 3.4) < 1e-9
    assert count.accepted_per_draft(0) == 1.0 and DecodeCount().tokens_per_step == 1.0


def test_benchmarked_processes_start_with_the_pinned_heap_and_keep_user_settings(monkeypatch):
    """The variables reach a process started afterwards (glibc reads them at start-up); a
    value the user set stays. Both variables are restored afterwards (set first so that
    monkeypatch records them: deleting an absent variable records nothing, and the pinned
    value would reach every later test's processes)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "unset by the test")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    pin_heap_for_child_processes()
    seen = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_THRESHOLD_'], "
                           "os.environ['MALLOC_TRIM_THRESHOLD_'])"], capture_output=True, text=True, check=True)
    assert seen.stdout.split() == [PINNED_HEAP_ENV["MALLOC_MMAP_THRESHOLD_"], "12345"]


def test_server_counters_give_accepted_length_and_the_drafted_share_of_request_steps():
    """Over a level 100 tokens were generated: 30 request-steps verified 2 drafts each and
    accepted 20 of them (80 request-steps in all, 30/80 drafted, 1 + 20/30 tokens each);
    a server that never drafted reports no accepted length."""
    before = {name: 1000.0 for name in SPEC_COUNTERS}
    grown = {"drafts": 30, "draft_tokens": 60, "accepted": 20, "generated": 100}
    summary = speculation_summary(before, {name: before[name] + grown[name] for name in SPEC_COUNTERS})
    assert abs(summary["mean_accepted_length"] - (1 + 20 / 30)) < 1e-9
    assert summary["verified_draft_tokens_per_draft"] == 2.0
    assert abs(summary["drafted_request_steps_share"] - 30 / 80) < 1e-9
    plain = speculation_summary(before, {**before, "generated": 1100.0})
    assert plain == {"mean_accepted_length": None, "verified_draft_tokens_per_draft": None,
                     "drafted_request_steps_share": 0.0}


def test_server_levels_send_new_prompts_of_varied_lengths():
    """Each load level sends prompts no earlier level sent (wrapping round the pool only when
    it is used up), and its requests' lengths vary around the mean, never in lockstep."""
    pool = [f"prompt {index}" for index in range(100)]
    levels = [level_requests(pool, level, 48, 32) for level in range(3)]
    first, second = ({prompt for prompt, _ in level} for level in levels[:2])
    assert len(first) == 48 and not first & second
    assert [prompt for prompt, _ in levels[2]][:4] == ["prompt 96", "prompt 97", "prompt 98", "prompt 99"]
    lengths = output_lengths(48, 32)
    assert [tokens for _, tokens in levels[0]] == lengths
    assert min(lengths) == 16 and max(lengths) == 48 and abs(sum(lengths) / len(lengths) - 32) < 1
    assert len(set(lengths)) > 24
