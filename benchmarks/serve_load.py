"""Throughput and latency of the OpenAI server (``vllm-cast serve``, loopback) under
concurrent streaming load, in the style of ``vllm bench serve``: vanilla, vLLM's EAGLE-3
chain and CAST on the same model pair and the same requests. The three servers run at once
and each load level (clients, round) is sent to each server in turn, the order rotating per
level, so drift in machine speed hits all of them alike (one server after another, vanilla's
tokens/s at 16 clients moved 519-675 between three runs of one afternoon).

As ``vllm bench serve`` sends dataset samples, each level sends prompts no earlier level sent
and asks each request for its own number of tokens (``output_lengths``: between half and
one and a half times ``--max-tokens``). With every request the same length and the same
prompts each round, plain decoding's clients stayed in lockstep (four prompts arriving in
one step, at token counts the engine had run the round before) while a speculating
server's drifted apart: in one process, 4 clients, 96 requests of 32 tokens, vanilla ran 24
prompt steps a round in 1.0-1.3 s and CAST 57-93 in 1.5-2.4 s.

``python -m benchmarks.serve_load [--requests N] [--concurrency C ...] [--rounds R] [--out DIR]`` writes
``serve_load.json`` and prints a table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from benchmarks.allocator import pin_heap_for_child_processes
from vllm_cast.prompts import TASKS, load_prompts
from vllm_cast.serving import gauges, served, timed_stream

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per server; vLLM's auto size takes most of RAM


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


SPEC_COUNTERS = {"drafts": "vllm:spec_decode_num_drafts_total", "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
                 "accepted": "vllm:spec_decode_num_accepted_tokens_total", "generated": "vllm:generation_tokens_total"}
"""The server's Prometheus counters read around each load level (vLLM's names)."""


def spec_counters(url: str) -> dict[str, float]:
    """``SPEC_COUNTERS``' values on the server now, by short name (one read of /metrics)."""
    values = gauges(url, SPEC_COUNTERS.values())
    return {name: values[metric] for name, metric in SPEC_COUNTERS.items()}


def speculation_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """From the counters' growth over a level (a request-step is one request in one engine
    step; it emits one token plus its accepted drafts): the mean accepted length of
    request-steps that verified drafts (bonus token included), the draft tokens each of
    them verified, and their share of all request-steps. The first two are None where no
    request-step verified drafts."""
    grown = {name: after[name] - before[name] for name in SPEC_COUNTERS}
    request_steps = grown["generated"] - grown["accepted"]
    drafts = grown["drafts"]
    return {"mean_accepted_length": 1 + grown["accepted"] / drafts if drafts else None,
            "verified_draft_tokens_per_draft": grown["draft_tokens"] / drafts if drafts else None,
            "drafted_request_steps_share": drafts / request_steps if request_steps else None}


def output_lengths(requests: int, mean_tokens: int) -> list[int]:
    """Deterministic per-request ``max_tokens``, spread evenly over ``mean_tokens // 2`` to
    ``mean_tokens // 2 + mean_tokens`` (mean about ``mean_tokens``)."""
    low = mean_tokens // 2
    return [low + (index * 13) % (mean_tokens + 1) for index in range(requests)]


def level_requests(pool: list[str], level: int, requests: int, mean_tokens: int) -> list[tuple[str, int]]:
    """Load level ``level``'s (prompt, max_tokens) pairs: the ``requests`` prompts of ``pool``
    after those of earlier levels (wrapping round the pool), each with its output length."""
    start = level * requests
    prompts = [pool[(start + index) % len(pool)] for index in range(requests)]
    return list(zip(prompts, output_lengths(requests, mean_tokens)))


def load(url: str, model: str, requests: list[tuple[str, int]], concurrency: int) -> dict[str, float | None]:
    """Send every (prompt, max_tokens) request (streamed, greedy) with ``concurrency``
    clients; summarise the level: throughput, latency percentiles and the speculation the
    server did (``speculation_summary``)."""
    counters = spec_counters(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda request: timed_stream(url, model, *request), requests))
    wall = time.perf_counter() - started
    speculation = speculation_summary(counters, spec_counters(url))
    ttft = [first for _, first, _ in replies]
    latency = [total for _, _, total in replies]
    output_tokens = sum(max_tokens for _, max_tokens in requests)
    return {"concurrency": concurrency, "requests": len(requests), "wall_s": wall,
            "requests_per_s": len(requests) / wall, "output_tokens_per_s": output_tokens / wall,
            **{f"ttft_p{q}_ms": 1e3 * percentile(ttft, q) for q in (50, 90, 99)},
            **{f"latency_p{q}_ms": 1e3 * percentile(latency, q) for q in (50, 90, 99)},
            "mean_latency_ms": 1e3 * statistics.fmean(latency), **speculation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--max-tokens", type=int, default=32,
                        help="mean output length; each request asks for its own, from half to 1.5 times this")
    parser.add_argument("--rounds", type=int, default=4,
                        help="times each concurrency level is run on the same server (round 1 is cold for CAST, "
                             "whose overheads, acceptance and throughput are learned online); one round of 48 "
                             "requests moves by up to ~10%% between rounds, so the summary takes the median")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_small"))
    args = parser.parse_args()

    from vllm_cast.fixtures.build import build_fixture

    fixture = build_fixture("ci")
    pin_heap_for_child_processes()
    target, draft = str(fixture / "target"), str(fixture / "eagle3")
    prompts = [p for task in TASKS for p in load_prompts(task)]
    pool = [prompts[(i * 7) % len(prompts)][:1500] for i in range(len(prompts))]  # tasks interleaved
    configs = {"vanilla": None, "eagle3_chain_k2": {"method": "eagle3", "model": draft, "num_speculative_tokens": 2},
               "cast": {"method": "cast", "model": draft, "num_speculative_tokens": 16}}
    rows = []
    # Prefix caching off, as in benchmarks.speedup: every server gets each level's prompts,
    # and the pool's prompts share their tasks' openings; cache hits would favour vanilla
    # (EAGLE recomputes the last cached block).
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(served(
                    target, spec, Path(logs) / f"{name}.log",
                    extra_args=("--max-num-seqs", str(max(args.concurrency)), "--no-enable-prefix-caching")))
                for name, spec in tqdm(configs.items(), desc="start servers", unit="server")}
        for url in urls.values():
            timed_stream(url, target, pool[-1], 4)  # warm-up
        names = list(urls)
        levels = [(c, r) for c in args.concurrency for r in range(1, args.rounds + 1)]
        for index, (c, r) in enumerate(tqdm(levels, desc="load levels", unit="level")):
            turn = index % len(names)
            requests = level_requests(pool, index, args.requests, args.max_tokens)
            for name in names[turn:] + names[:turn]:
                rows.append({"config": name, "round": r, **load(urls[name], target, requests, c)})
    rows.sort(key=lambda row: (names.index(row["config"]), row["concurrency"], row["round"]))
    vanilla = {(r["concurrency"], r["round"]): r["output_tokens_per_s"] for r in rows if r["config"] == "vanilla"}
    for row in rows:
        row["throughput_vs_vanilla"] = row["output_tokens_per_s"] / vanilla[row["concurrency"], row["round"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(rows, indent=1))
    print("| config | clients | round | tokens/s | vs vanilla | TTFT p50/p99 ms | latency p50/p90/p99 ms "
          "| drafted request-steps | mean accepted length |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        drafted = r["drafted_request_steps_share"]
        accepted = r["mean_accepted_length"]
        print(f"| {r['config']} | {r['concurrency']} | {r['round']} | {r['output_tokens_per_s']:.0f} | "
              f"{r['throughput_vs_vanilla']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['latency_p50_ms']:.0f} / {r['latency_p90_ms']:.0f} / {r['latency_p99_ms']:.0f} | "
              f"{'-' if drafted is None else f'{drafted:.0%}'} | {'-' if accepted is None else f'{accepted:.2f}'} |")
    print()
    print("| config | clients | vs vanilla per round | median |")
    print("|---|---|---|---|")
    for name in names:
        for c in args.concurrency:
            ratios = [r["throughput_vs_vanilla"] for r in rows if r["config"] == name and r["concurrency"] == c]
            print(f"| {name} | {c} | {' / '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
