"""Start ``vllm-cast serve`` on loopback and talk to it (tests and the load benchmark)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(target: str, speculative_config: dict | None, log_path: Path, extra_args: tuple[str, ...] = (),
           startup_timeout: float = 240.0):
    """Run ``vllm-cast serve`` (vLLM's OpenAI server) and yield its base URL."""
    port = free_port()
    cli = Path(sys.executable).with_name("vllm-cast")
    cmd = [str(cli), "serve", target, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "4096", "--enforce-eager", "--seed", "0", *extra_args]
    if speculative_config is not None:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    raise TimeoutError(f"server did not start in {startup_timeout}s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def complete(url: str, model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> str:
    """Text of one non-streaming /v1/completions answer."""
    reply = requests.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature},
        timeout=120,
    )
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def timed_stream(url: str, model: str, prompt: str, max_tokens: int, temperature: float = 0.0,
                 abort_after: int | None = None) -> tuple[str, float, float]:
    """One streamed /v1/completions answer: (text, seconds to the first chunk, seconds in
    all); with ``abort_after`` the client drops the connection after that many chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    text, chunks, first = [], 0, float("nan")
    start = time.perf_counter()
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if chunks == 0:
                first = time.perf_counter() - start
            text.append(json.loads(line[6:])["choices"][0]["text"])
            chunks += 1
            if abort_after is not None and chunks >= abort_after:
                break
    return "".join(text), first, time.perf_counter() - start


def stream(url: str, model: str, prompt: str, max_tokens: int, temperature: float = 0.0,
           abort_after: int | None = None) -> str:
    """Text of one streamed answer (see :func:`timed_stream`)."""
    return timed_stream(url, model, prompt, max_tokens, temperature, abort_after)[0]


def gauge(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples on the server's /metrics."""
    return gauges(url, [name])[name]


def gauges(url: str, names: Iterable[str]) -> dict[str, float]:
    """Per metric name, the sum of its samples, from one read of the server's /metrics."""
    totals = dict.fromkeys(names, 0.0)
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals
