"""One benchmark configuration in its own process: build the engine once, print ``READY``,
then for every ``[task, temperature, batch_size]`` JSON line on stdin time that cell and print
one ``ROW {json}`` line (an empty line ends the process). The driver sends the same cell to
every configuration in turn, so drift in machine speed hits all of them alike.

Invoked by ``benchmarks.speedup``; not meant to be run by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; avoids the memory-utilisation start check


REQUESTS_PER_CELL = 4
"""Requests a cell decodes at least, in waves of ``batch_size`` requests one after another
(batch size 1: the task's first four prompts one at a time, the same prompts a batch-4 cell
decodes at once). With one request, a batch-1 cell hinged on one continuation: on the small
grid CAST read 1.13x and the chain 1.21x over the six first prompts, while over three
prompts per task, side by side in one process, CAST decoded in 7.51 s what the chain
decoded in 8.30 s."""


def _counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode") and hasattr(m, "value")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--spec", default="null", help="speculative_config as JSON (null: vanilla)")
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from benchmarks.allocator import minor_page_faults
    from benchmarks.decode_steps import DecodeCount, generate_counting_steps
    from vllm_cast.prompts import load_prompts

    spec = json.loads(args.spec)
    # Prefix caching off: every cell repeats the same prompts, and vLLM's EAGLE path recomputes
    # the last cached block of each prompt (its drafter needs those hidden states), so cache
    # hits on the repeats would favour vanilla by up to a block per request in every cell.
    llm = LLM(model=args.target, speculative_config=spec, dtype=args.dtype, enforce_eager=True, max_model_len=4096,
              seed=0, disable_log_stats=False, max_num_seqs=args.max_batch, enable_prefix_caching=False)
    is_cast = bool(spec) and spec.get("method") == "cast"

    def run(task: str, temperature: float, batch: int) -> tuple[float, DecodeCount]:
        """Seconds, tokens and decode steps of decoding the cell's waves of ``batch`` requests."""
        prompts = load_prompts(task)
        waves = -(-REQUESTS_PER_CELL // batch)
        params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True)
        count = DecodeCount()
        start = time.perf_counter()
        for wave in range(waves):
            count += generate_counting_steps(llm, [prompts[(wave * batch + i) % len(prompts)] for i in range(batch)],
                                             params)
        return time.perf_counter() - start, count

    run("mt_bench", 0.0, 1)  # warm-up
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        task, temperature, batch = json.loads(line)
        before = _counters(llm)
        stats_before = llm.collective_rpc("cast_stats")[0] if is_cast else None
        faults_before = minor_page_faults()
        seconds, count = run(task, temperature, batch)
        faults = minor_page_faults() - faults_before
        after = _counters(llm)

        def delta(name: str, after=after, before=before) -> float:
            return after.get(f"vllm:spec_decode_{name}", 0.0) - before.get(f"vllm:spec_decode_{name}", 0.0)

        drafts = delta("num_drafts")
        row = {"task": task, "temperature": temperature, "batch_size": batch, "seconds": seconds,
               "tokens": count.tokens, "tokens_per_s": count.tokens / seconds,
               "mean_accepted_length": count.accepted_per_draft(drafts),
               "tokens_per_step": count.tokens_per_step,
               "verified_tokens_per_step": 1 + delta("num_draft_tokens") / drafts if drafts else 1.0,
               "minor_page_faults": faults}
        if is_cast:
            stats = llm.collective_rpc("cast_stats")[0]
            steps = stats["timed_steps"] - stats_before["timed_steps"]
            if steps:
                row["measured_step_ms"] = 1e3 * (stats["measured_step_seconds"] - stats_before["measured_step_seconds"]) / steps
                row["predicted_step_ms"] = 1e3 * (stats["predicted_step_seconds"] - stats_before["predicted_step_seconds"]) / steps
                row["priced_step_ms"] = 1e3 * (stats["priced_step_seconds"] - stats_before["priced_step_seconds"]) / steps
            # Why CAST drafted or stayed plain here: its measured verdicts after the cell.
            row["cast_verdicts"] = {name: value for name, value in stats.items()
                                    if name.startswith(("cohort_speedup_b", "step_verdict_slower_b"))}
        print("ROW " + json.dumps(row), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip engine teardown


if __name__ == "__main__":
    main()
