"""Soak: the OpenAI server with CAST trees under concurrent streaming and non-streaming
requests (mixed prompt lengths, max_tokens, temperatures 0 and 1, n > 1), some clients
aborting mid-stream. Afterwards every greedy answer equals vanilla offline greedy, no request
hung, and the KV cache is back to idle."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import tree_spec
from vllm import SamplingParams

from vllm_cast.prompts import TASKS, load_prompts
from vllm_cast.serving import complete, gauge, served, stream

CLIENTS = 6
REQUESTS = 48


def test_soak_concurrent_streams_aborts_and_no_kv_leak(tmp_path, target_dir, draft_dir, vanilla_llm):
    rng = random.Random(0)
    prompts = [p[: rng.choice([80, 400, 1500])] for task in TASKS for p in load_prompts(task, limit=4)]
    jobs = []
    for index in range(REQUESTS):
        kind = ("greedy", "greedy_stream", "sampled", "sampled_n2", "abort")[index % 5]
        jobs.append((kind, prompts[index % len(prompts)], rng.choice([8, 24, 48])))
    greedy = [(p, m) for kind, p, m in jobs if kind.startswith("greedy")]
    expected = {(p, m): o.outputs[0].text for (p, m), o in zip(greedy, vanilla_llm.generate(
        [p for p, _ in greedy], [SamplingParams(temperature=0.0, max_tokens=m) for _, m in greedy], use_tqdm=False))}

    with served(target_dir, tree_spec(draft_dir), tmp_path / "server.log") as url:
        def run(job):
            kind, prompt, max_tokens = job
            if kind == "greedy":
                return kind, prompt, max_tokens, complete(url, target_dir, prompt, max_tokens)
            if kind == "greedy_stream":
                return kind, prompt, max_tokens, stream(url, target_dir, prompt, max_tokens)
            if kind == "abort":
                return kind, prompt, max_tokens, stream(url, target_dir, prompt, 48, 1.0, abort_after=2)
            body = {"model": target_dir, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                    "n": 2 if kind == "sampled_n2" else 1}
            reply = requests.post(f"{url}/v1/completions", json=body, timeout=120)
            reply.raise_for_status()
            return kind, prompt, max_tokens, [c["text"] for c in reply.json()["choices"]]

        started = time.time()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(run, jobs))
        elapsed = time.time() - started
        deadline = time.time() + 30
        while gauge(url, "vllm:num_requests_running") + gauge(url, "vllm:num_requests_waiting") > 0:
            assert time.time() < deadline, "requests still running after every client finished"
            time.sleep(0.5)
        usage = gauge(url, "vllm:kv_cache_usage_perc")
        accepted = gauge(url, "vllm:spec_decode_num_accepted_tokens_total")
    mismatches = [(p[:40], m) for kind, p, m, text in results if kind.startswith("greedy") and text != expected[(p, m)]]
    aborted = sum(kind == "abort" for kind, *_ in results)
    print(f"{len(results)} requests in {elapsed:.1f}s, {aborted} aborted, {accepted:.0f} draft tokens accepted, "
          f"KV usage after {usage:.4f}, greedy mismatches {len(mismatches)}")
    assert mismatches == []
    assert all(len(text) == 2 for kind, _, _, text in results if kind == "sampled_n2")
    assert usage == 0.0, "KV cache blocks still held after all requests ended"
    assert accepted > 0, "the server never accepted a tree token"
